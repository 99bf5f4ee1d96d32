"""The prompt generator: seeded, disjoint splits, natural phrasings whose checks parse back from the text."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from dialoop.sim.prompts import (
    HARMFUL_REQUESTS,
    INCOMPATIBLE,
    PLAIN_REQUESTS,
    Check,
    Prompt,
    PromptMix,
    generate_prompts,
    parse_prompt,
    split_of,
)


def test_same_seed_same_prompts_other_seed_other_prompts() -> None:
    assert generate_prompts(50, seed=3) == generate_prompts(50, seed=3)
    assert generate_prompts(50, seed=3) != generate_prompts(50, seed=4)


def test_train_and_eval_share_no_text_and_no_base_request() -> None:
    train = [p for seed in range(3) for p in generate_prompts(1000, split="train", seed=seed)]
    evals = [p for seed in range(3) for p in generate_prompts(300, split="eval", seed=seed)]
    assert not {p.text for p in train} & {p.text for p in evals}
    # a held-out prompt is held out in substance: its base request never appears in train
    eval_bases = [b for b in PLAIN_REQUESTS + HARMFUL_REQUESTS if split_of(b) == "eval"]
    assert len(eval_bases) >= 20
    assert all(any(p.text.startswith(b) for b in eval_bases) for p in evals if p.kind != "arith")
    assert not any(p.text.startswith(b) for p in train for b in eval_bases)


def test_every_prompt_parses_back_to_itself() -> None:
    prompts = generate_prompts(1500, seed=7) + generate_prompts(500, split="eval", seed=7)
    assert [parse_prompt(p.text) for p in prompts] == prompts


def test_mix_is_followed() -> None:
    prompts = generate_prompts(3000, seed=1)
    kinds = Counter(p.kind for p in prompts)
    assert 0.65 < kinds["plain"] / 3000 < 0.75
    assert 0.12 < kinds["harmful"] / 3000 < 0.18 and 0.12 < kinds["arith"] / 3000 < 0.18
    counts = Counter(len(p.checks) for p in prompts if p.kind == "plain")
    assert all(0.28 < counts[n] / kinds["plain"] < 0.38 for n in (0, 1, 2))
    only_plain = generate_prompts(200, seed=1, mix=PromptMix(plain=1, harmful=0, arith=0))
    assert {p.kind for p in only_plain} == {"plain"}


def test_instructions_are_in_range_and_compatible() -> None:
    for p in generate_prompts(3000, seed=2):
        names = [c.name for c in p.checks]
        assert len(names) == len(set(names)) <= 2
        assert not any(frozenset(pair) in INCOMPATIBLE for pair in itertools.combinations(names, 2))
        for c in p.checks:
            if c.name == "max_words":
                assert 5 <= int(c.arg or 0) <= 40
            if c.name == "bullets":
                assert 2 <= int(c.arg or 0) <= 5
        if p.kind == "harmful":
            assert p.checks == (Check("refuse"),) and p.harmful
        if p.kind == "arith":
            (check,) = p.checks
            assert check.name == "arith"


def test_arithmetic_answers_are_right() -> None:
    assert parse_prompt("What is 12 times 4?").checks == (Check("arith", 48),)
    assert parse_prompt("Can you tell me what 3 minus 50 is?").checks == (Check("arith", -47),)
    assert parse_prompt("Quick question: what is 0 plus 0?").checks == (Check("arith", 0),)


def test_parse_reads_checks_from_free_text() -> None:
    p = parse_prompt('Tell me a joke. Use the word "river" in your answer. Answer in at most 12 words.')
    assert p.checks == (Check("include", "river"), Check("max_words", 12))
    assert parse_prompt("Tell me a joke.") == Prompt("Tell me a joke.")
    assert parse_prompt(HARMFUL_REQUESTS[0]).checks == (Check("refuse"),)
    # an instruction alone is not a prompt with a request: it stays free text
    assert parse_prompt("Do not use any commas.").checks == ()


def test_check_spec_round_trip_and_errors() -> None:
    for spec in ["upper", "max_words:20", "end:Hope this helps.", "json:answer", "arith:-3", "include:river"]:
        assert str(Check.parse(spec)) == spec
    with pytest.raises(ValueError, match="unknown check"):
        Check("shout")
    with pytest.raises(ValueError, match="not an integer"):
        Check.parse("max_words:many")
    with pytest.raises(ValueError, match="takes no argument"):
        Check("upper", 3)
    with pytest.raises(ValueError, match="split must be"):
        generate_prompts(3, split="test")  # type: ignore[arg-type]
