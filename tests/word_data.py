"""The few demonstrations and rankings the model-family and LoRA tests train on: say a word."""

from __future__ import annotations

from dialoop.records import ChatExample, RankingExample

WORDS = ["cats", "dogs", "tea", "sun"]
DEMOS = [
    ChatExample(
        messages=[{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]
    )
    for w in WORDS
]
RANKINGS = [
    RankingExample(
        prompt=[{"role": "user", "content": f"Say {w}."}],
        completions=[f"{w}!", "no", "maybe"],
        ranking=[0, 1, 2],
    )
    for w in WORDS
]
