"""`rankings`: K-way comparisons,
`{"prompt": [...], "completions": [[...], ...], "ranking": [best..worst], "ties": [[i, j], ...]}`.

An optional `"all_bad": true` marks a ranking whose every completion is bad (written only when true); an
optional `"truncated": [i, ...]` names the completions cut off at a token limit, before their end-of-turn
token (written only when there are some)."""

from __future__ import annotations

from typing import Any

from dialoop.formats.messages import assistant_turn, parse_prompt, parse_reply, require_object
from dialoop.records import RankingExample


def _index(value: Any, k: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < k:
        raise ValueError(f"{what} must be a completion index from 0 to {k - 1}, not {value!r}")
    return value


def parse(value: Any) -> RankingExample:
    obj = require_object(value, ("prompt", "completions", "ranking"))
    prompt = parse_prompt(obj["prompt"])
    raw = obj["completions"]
    if not isinstance(raw, list) or len(raw) < 2:
        raise ValueError("completions must be a list of at least 2 completions")
    completions = [parse_reply(c, f"completions[{i}]") for i, c in enumerate(raw)]
    k = len(completions)
    all_bad = obj.get("all_bad", False)
    if not isinstance(all_bad, bool):
        raise ValueError("all_bad must be true or false")
    if not isinstance(obj["ranking"], list):
        raise ValueError("ranking must be a list of completion indices, best first")
    ranking = [_index(i, k, "ranking entry") for i in obj["ranking"]]
    if len(set(ranking)) != len(ranking):
        raise ValueError("ranking names a completion twice")
    if len(ranking) < 2 and not all_bad:
        raise ValueError("ranking must order at least 2 completions (or set all_bad)")
    raw_ties = obj.get("ties", [])
    if not isinstance(raw_ties, list):
        raise ValueError("ties must be a list of [i, j] pairs")
    ties: list[tuple[int, int]] = []
    for tie in raw_ties:
        if not isinstance(tie, list) or len(tie) != 2:
            raise ValueError(f"each tie must be a pair [i, j], not {tie!r}")
        i, j = _index(tie[0], k, "tie entry"), _index(tie[1], k, "tie entry")
        if i == j:
            raise ValueError(f"a tie needs two different completions, not {tie!r}")
        ties.append((i, j))
    raw_truncated = obj.get("truncated", [])
    if not isinstance(raw_truncated, list):
        raise ValueError("truncated must be a list of completion indices")
    truncated = [_index(i, k, "truncated entry") for i in raw_truncated]
    if len(set(truncated)) != len(truncated):
        raise ValueError("truncated names a completion twice")
    return RankingExample(
        prompt=prompt,
        completions=completions,
        ranking=ranking,
        ties=ties,
        all_bad=all_bad,
        truncated=truncated,
    )


def dump(example: RankingExample) -> list[dict[str, Any]]:
    line: dict[str, Any] = {
        "prompt": example.prompt,
        "completions": [assistant_turn(c) for c in example.completions],
        "ranking": list(example.ranking),
        "ties": [list(t) for t in example.ties],
    }
    if example.all_bad:
        line["all_bad"] = True
    if example.truncated:
        line["truncated"] = list(example.truncated)
    return [line]
