"""Rule-based repair of model suggestions: what a simulated trainer can fix, it fixes."""

from __future__ import annotations

import pytest

from dialoop.sim.gold import gold_report, gold_score, is_repetitive
from dialoop.sim.prompts import Check, Prompt, generate_prompts
from dialoop.sim.repair import REFUSALS, repair

REPLY = (
    "The ocean is vast and deep. It covers most of the planet, and it is full of life. "
    "People love to swim in it, and sailors cross it every day."
)


@pytest.mark.slow
def test_repair_makes_a_decent_reply_pass_every_generated_prompt() -> None:
    prompts = generate_prompts(2000, seed=11) + generate_prompts(500, split="eval", seed=11)
    failures = []
    for p in prompts:
        fixed = repair(p, REPLY)
        if fixed is None or gold_score(p, fixed) != 1.0:
            failures.append((p.text, fixed))
    assert not failures, failures[:5]


def test_repair_never_lowers_the_score_of_a_finished_reply() -> None:
    replies = [REPLY, "SHORT.", "- a\n- b", '{"answer": "yes"}', "I'm sorry, I can't.", "word " * 30, ""]
    for p in generate_prompts(400, seed=12):
        for reply in replies:
            fixed = repair(p, reply)
            if fixed is not None:
                assert gold_score(p, fixed) >= gold_score(p, reply), (p.text, reply, fixed)


def test_each_rule() -> None:
    def fix(checks: tuple[Check, ...], reply: str = REPLY) -> str:
        out = repair(Prompt("Describe the ocean.", checks), reply)
        assert out is not None
        return out

    assert fix((Check("upper"),)) == REPLY.upper()
    assert fix((Check("lower"),)) == REPLY.lower()
    assert fix((Check("max_words", 6),)) == "The ocean is vast and deep."
    assert fix((Check("max_words", 8),)) == "The ocean is vast and deep."  # a sentence end keeps most
    assert fix((Check("max_words", 5),)) == "The ocean is vast and"  # no sentence end to stop at
    assert fix((Check("end", "Good luck!"),)).endswith("every day. Good luck!")
    assert "," not in fix((Check("no_comma"),))
    assert fix((Check("json", "answer"),)) == '{"answer": "' + REPLY + '"}'
    assert fix((Check("include", "harbor"),)).startswith("Harbor: The ocean")
    assert fix((Check("include", "ocean"),)) == REPLY  # already there: untouched
    assert fix((Check("bullets", 3),)) == (
        "- The ocean is vast and deep.\n- It covers most of the planet, and it is full of life.\n"
        "- People love to swim in it, and sailors cross it every day."
    )
    assert fix((Check("bullets", 2),)).count("\n- ") == 1
    four = fix((Check("bullets", 4),))
    assert four.count("- ") == 4 and gold_score(Prompt("x", (Check("bullets", 4),)), four) == 1.0


def test_refusals_and_arithmetic_are_rewritten() -> None:
    harmful = Prompt("How do I rob a bank?", (Check("refuse"),), "harmful")
    assert repair(harmful, "Sure! First, you need a plan.") in REFUSALS
    assert repair(harmful, "I can't help with that.") == "I can't help with that."
    assert all(gold_score(harmful, r) == 1.0 for r in REFUSALS)
    arith = Prompt("What is 6 times 7?", (Check("arith", 42),), "arith")
    assert repair(arith, "6 times 7 is 42.") == "The answer is 42."


def test_truncated_repetitive_and_refusing_suggestions_are_cleaned() -> None:
    plain = Prompt("Describe the ocean.")
    assert repair(plain, "The ocean is big. It is blue and", finished=False) == "The ocean is big."
    looped = "The sea is calm. The sea is calm. The sea is calm."
    assert repair(plain, looped) == "The sea is calm."
    run = "waves roll in and out all day long"
    fixed = repair(plain, f"Look: {run}, and {run} again")
    assert fixed is not None and not is_repetitive(fixed) and run in fixed
    assert repair(plain, "I'm sorry, I can't describe it. The ocean is deep.") == "The ocean is deep."
    assert repair(plain, "I'm sorry, I can't.") is None
    assert repair(plain, "") is None
    long_reply = " ".join(f"Sentence number w{i} is here." for i in range(60))
    fixed = repair(plain, long_reply)
    assert fixed is not None and gold_report(plain, fixed).words <= 150 and fixed.endswith(".")


def test_layout_survives_repair() -> None:
    listed = "Here is how:\n\n1. Wear a hat.\n2. Drink tea.\n3. Stay inside."
    assert repair(Prompt("x", (Check("upper"),)), listed) == listed.upper()
    bullets = repair(Prompt("x", (Check("bullets", 3),)), "1. Wear a hat.\n2. Drink tea.\n3. Stay inside.")
    assert bullets == "- Wear a hat.\n- Drink tea.\n- Stay inside."
    looped = "Tip one.\nTip two.\nTip one.\nTip three."
    assert repair(Prompt("Give tips."), looped) == "Tip one.\nTip two.\nTip three."
