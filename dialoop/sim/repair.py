"""What a simulated trainer does to a model suggestion before saving it: fix what a rule can fix."""

from __future__ import annotations

import json
import re

from dialoop.sim.gold import (
    LENGTH_FREE_WORDS,
    MAX_REFUSAL_WORDS,
    REPEATED_RUN,
    SENTENCE_BREAK,
    check_passes,
    is_refusal,
    normalized_words,
    split_sentences,
    word_count,
)
from dialoop.sim.prompts import Check, Prompt

REFUSALS = (
    "I'm sorry, but I can't help with that. It could hurt people or break the law.",
    "I can't help with that request because it could cause real harm. Is there something else I can do?",
    "I'm sorry, I won't provide instructions for that. If someone is in danger, please contact local "
    "emergency services.",
)
_SENTENCE_END_RE = re.compile(r"[.!?](?=\s|$)")


def _dedupe(text: str) -> str:
    """Drop repeated sentences, then cut before the first run of 8 words seen earlier; layout is kept."""
    pieces = re.split(f"({SENTENCE_BREAK})", text)  # sentence, break, sentence, break, ...
    kept: list[str] = []
    seen: set[str] = set()
    for i in range(0, len(pieces), 2):
        key = " ".join(normalized_words(pieces[i]))
        if key and key in seen:
            continue  # the repeat goes, with the break after it
        seen.add(key)
        kept.append(pieces[i] + (pieces[i + 1] if i + 1 < len(pieces) else ""))
    text = "".join(kept).strip()
    words = list(re.finditer(r"\S+", text))
    runs: set[tuple[str, ...]] = set()
    window: list[tuple[str, int]] = []  # (normalized word, index of the written word it comes from)
    for index, match in enumerate(words):
        for word in normalized_words(match.group()):
            window.append((word, index))
            if len(window) >= REPEATED_RUN:
                run = tuple(w for w, _ in window[-REPEATED_RUN:])
                if run in runs:
                    return text[: words[window[-REPEATED_RUN][1]].start()].rstrip()
                runs.add(run)
    return text


def _cut_to_last_sentence(text: str) -> str:
    """A reply cut off mid-sentence keeps its complete sentences (all of it when it has none)."""
    ends = list(_SENTENCE_END_RE.finditer(text))
    return text[: ends[-1].end()] if ends else text


def _cut_words(text: str, limit: int) -> str:
    """At most `limit` words, ending at a sentence end when one is close enough to keep most of it."""
    words = text.split()
    if len(words) <= limit:
        return text
    cut = " ".join(words[:limit])
    sentence = _cut_to_last_sentence(cut)
    return sentence if word_count(sentence) >= limit // 2 else cut


def _bulletize(text: str, n: int) -> str | None:
    """Exactly `n` lines starting with "- ": one per sentence when there are enough, else word chunks."""
    sentences = split_sentences(re.sub(r"^\s*(?:[-*]|\d+[.)])\s+", "", text, flags=re.MULTILINE))
    if len(sentences) >= n:
        items = [*sentences[: n - 1], " ".join(sentences[n - 1 :])]
    else:
        words = " ".join(sentences).split()
        if len(words) < n:
            return None
        size, extra = divmod(len(words), n)
        items, start = [], 0
        for i in range(n):
            stop = start + size + (1 if i < extra else 0)
            items.append(" ".join(words[start:stop]))
            start = stop
    return "\n".join(f"- {item}" for item in items)


def repair(prompt: Prompt, reply: str, *, finished: bool = True) -> str | None:
    """The reply after the guide's rule-based fixes, or None when nothing usable is left."""
    checks = {c.name: c for c in prompt.checks}
    if "refuse" in checks:
        keep = is_refusal(reply) and word_count(reply) <= MAX_REFUSAL_WORDS
        return reply.strip() if keep else REFUSALS[len(prompt.text) % len(REFUSALS)]
    if "arith" in checks:
        return f"The answer is {checks['arith'].arg}."
    text = reply.strip()
    if not finished:
        text = _cut_to_last_sentence(text)
    if is_refusal(text):  # a harmless request is never refused: keep only the sentences that help
        text = " ".join(s for s in split_sentences(text) if not is_refusal(s))
    text = _cut_words(_dedupe(text), LENGTH_FREE_WORDS)
    if not text:
        return None
    return _apply_instructions(checks, text)


def _apply_instructions(checks: dict[str, Check], text: str) -> str | None:
    if "include" in checks and not check_passes(checks["include"], text):
        text = f"{str(checks['include'].arg).capitalize()}: {text}"
    end = str(checks["end"].arg) if "end" in checks else ""
    if "max_words" in checks:
        # room left for what is added below: the end phrase, one dash per bullet, the JSON key
        budget = int(checks["max_words"].arg or 0) - word_count(end)
        budget -= int(checks["bullets"].arg or 0) if "bullets" in checks else 0
        budget -= 1 if "json" in checks else 0
        if budget < 1:
            return None
        text = _cut_words(text, budget)
    if "bullets" in checks:
        bullets = _bulletize(text, int(checks["bullets"].arg or 0))
        if bullets is None:
            return None
        text = bullets
    if end and not text.endswith(end):
        text = f"{text} {end}"
    if "no_comma" in checks:
        text = text.replace(",", "")
    if "json" in checks:
        text = json.dumps({str(checks["json"].arg): text}, ensure_ascii=False)
    if "upper" in checks:
        text = text.upper()
    if "lower" in checks:
        text = text.lower()
    return text
