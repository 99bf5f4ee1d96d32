"""Plain records with no dependencies: chat messages, demonstrations and rankings, passed between layers."""

from __future__ import annotations

from dataclasses import dataclass, field

ChatMessage = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class ChatExample:
    """One conversation for SFT; the loss covers its assistant turns."""

    messages: list[ChatMessage]


@dataclass(frozen=True)
class RankingExample:
    """K replies to one context, ranked by a trainer; one example is one reward-model batch element."""

    prompt: list[ChatMessage]  # the context; its last message is a user turn
    completions: list[str]  # the K assistant replies
    ranking: list[int]  # indices into `completions`, best first
    ties: list[tuple[int, int]] = field(default_factory=list)  # pairs judged equally good
    all_bad: bool = False  # every reply is bad: the RM learns its order only with `all_bad_orders`
    truncated: list[int] = field(default_factory=list)  # completions cut off before their end-of-turn token
