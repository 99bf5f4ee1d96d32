"""`hh-rlhf`: Anthropic's `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}`.

A line is split into turns at every `\\n\\nHuman: ` and `\\n\\nAssistant: `. The context is the longest
run of whole turns the two texts share, cut back to end with a Human turn; each candidate is the rest of
its text after the `\\n\\nAssistant: ` that follows the context, kept verbatim. Usually that is the last
Assistant turn; when the texts differ earlier (5 of the 1,600 lines of harmless-base-dev, where a reply
itself holds `\\n\\nAssistant: `), the candidate keeps the later turns as text. So `context + reply` is
always the source text byte for byte, and export writes it back unchanged. Chosen ranks above rejected.
"""

from __future__ import annotations

import re
from typing import Any

from dialoop.formats.jsonl import NotRepresentable
from dialoop.formats.messages import require_object
from dialoop.formats.pairs import ordered_pairs
from dialoop.records import ChatMessage, RankingExample

TURN_SEPARATOR = re.compile(r"\n\n(Human|Assistant): ")
SPEAKER_ROLE = {"Human": "user", "Assistant": "assistant"}
ROLE_SPEAKER = {role: speaker for speaker, role in SPEAKER_ROLE.items()}
REPLY_PREFIX = "\n\nAssistant: "


def split_turns(text: str, what: str) -> list[ChatMessage]:
    """The Human/Assistant turns of one transcript."""
    parts = TURN_SEPARATOR.split(text)
    if parts[0] != "" or len(parts) < 3 or parts[1] != "Human":
        raise ValueError(rf"{what} must start with '\n\nHuman: '")
    return [{"role": SPEAKER_ROLE[s], "content": c} for s, c in zip(parts[1::2], parts[2::2], strict=True)]


def render(prompt: list[ChatMessage]) -> str:
    """A chat of user and assistant turns as transcript text."""
    return "".join(f"\n\n{ROLE_SPEAKER[m['role']]}: {m['content']}" for m in prompt)


def parse(value: Any) -> RankingExample:
    obj = require_object(value, ("chosen", "rejected"))
    texts = [obj["chosen"], obj["rejected"]]
    for name, text in zip(("chosen", "rejected"), texts, strict=True):
        if not isinstance(text, str):
            raise ValueError(f"{name} must be a string")
    chosen, rejected = split_turns(texts[0], "chosen"), split_turns(texts[1], "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1]["role"] != "user":
        n -= 1
    if n == 0:
        raise ValueError("chosen and rejected differ in their first Human turn: no common context")
    prompt = chosen[:n]
    context_len = len(render(prompt))
    replies = []
    for name, text in zip(("chosen", "rejected"), texts, strict=True):
        if not text.startswith(REPLY_PREFIX, context_len):
            raise ValueError(f"{name} must continue the common context with an Assistant turn")
        replies.append(text[context_len + len(REPLY_PREFIX) :])
    return RankingExample(prompt=prompt, completions=replies, ranking=[0, 1])


def dump(example: RankingExample) -> list[dict[str, Any]]:
    if example.prompt[0]["role"] != "user" or any(m["role"] == "system" for m in example.prompt):
        raise NotRepresentable("hh-rlhf holds Human/Assistant turns that open with Human: no system messages")
    context = render(example.prompt)
    return [
        {
            "chosen": context + REPLY_PREFIX + example.completions[better],
            "rejected": context + REPLY_PREFIX + example.completions[worse],
        }
        for better, worse in ordered_pairs(example)
    ]
