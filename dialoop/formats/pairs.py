"""`pairs`: TRL's conversational preference format, `{"prompt": [...], "chosen": [...], "rejected": [...]}`.

A pair is a ranking of two candidates; a K-way ranking is written as all its (better, worse) pairs. TRL's
standard (plain text) form, `{"prompt": "...", "chosen": "...", "rejected": "..."}`, is read too: the prompt
as one user turn, each reply as one assistant turn; pairs are always written as messages."""

from __future__ import annotations

from typing import Any

from dialoop.formats.messages import assistant_turn, parse_prompt, parse_reply, require_object
from dialoop.records import RankingExample


def ordered_pairs(example: RankingExample, *, all_bad_orders: bool = False) -> list[tuple[int, int]]:
    """Every (better, worse) pair of candidate indices in the ranking, best first, tied pairs left out;
    none for an all-bad ranking (the trainer may not have ordered bad replies), unless `all_bad_orders`:
    its trainers rank bad replies too (the guide still prefers one that ends to one cut off)."""
    if example.all_bad and not all_bad_orders:
        return []
    tied = {frozenset(t) for t in example.ties}
    order = example.ranking
    return [
        (order[a], order[b])
        for a in range(len(order))
        for b in range(a + 1, len(order))
        if frozenset((order[a], order[b])) not in tied
    ]


def _as_turns(value: Any, role: str) -> Any:
    """A plain-text prompt or reply (TRL's standard form) as one turn; messages as they are."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def parse(value: Any) -> RankingExample:
    obj = require_object(value, ("prompt", "chosen", "rejected"))
    prompt = parse_prompt(_as_turns(obj["prompt"], "user"))
    chosen = parse_reply(_as_turns(obj["chosen"], "assistant"), "chosen")
    rejected = parse_reply(_as_turns(obj["rejected"], "assistant"), "rejected")
    return RankingExample(prompt=prompt, completions=[chosen, rejected], ranking=[0, 1])


def dump(example: RankingExample) -> list[dict[str, Any]]:
    return [
        {
            "prompt": example.prompt,
            "chosen": assistant_turn(example.completions[better]),
            "rejected": assistant_turn(example.completions[worse]),
        }
        for better, worse in ordered_pairs(example)
    ]
