"""Users' feedback in the loop (`dialoop iterate --rm-feedback`): A/B choices and thumbs (an up reply over a
down sibling) join the reward model's data, weighted; the report card counts each source."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from dialoop.collect import PolicyHandle, create_comparison_tasks
from dialoop.collect.chats import set_preference, set_thumbs
from dialoop.demo import demo_config
from dialoop.engine import SamplingParams
from dialoop.evaluate.card import EvalConfig
from dialoop.formats import snapshot_hash
from dialoop.iteration import IterationKnobs
from dialoop.loop import IterationConfig, rm_data, run_iteration
from dialoop.modeling import load_model_and_tokenizer
from dialoop.records import RankingExample
from dialoop.sim.prompts import generate_prompts
from dialoop.sim.trainers import SimTrainerConfig, create_trainers, rank_all
from dialoop.store.db import session_scope
from dialoop.store.feedback import feedback_ids
from dialoop.store.models import Conversation, Message, TrainingRun, User
from dialoop.store.registry import ensure_base_version
from dialoop.store.trees import add_message

JOKE = [{"role": "user", "content": "Tell me a joke."}]


def users_feedback(engine: Engine) -> None:
    """Two users chat and judge replies through `dialoop.collect`, as the chat page does: carol prefers
    "A pun." to "Knock knock." (A/B), thumbs "Knock knock." up and "No." down (dave too); "Thanks!" has a
    thumb up but no rated sibling, so it says nothing about what is better."""
    with session_scope(engine) as s:
        carol, dave = (User(name=n, role="user", password_hash="x") for n in ("carol", "dave"))
        s.add_all([carol, dave])
        chat = Conversation(kind="chat", owner=carol)
        s.add(chat)
        joke = add_message(s, chat, None, "user", "Tell me a joke.")
        knock, no, pun = (
            add_message(s, chat, joke, "assistant", t) for t in ("Knock knock.", "No.", "A pun.")
        )
        set_preference(s, pun, knock, carol)
        set_thumbs(s, knock, carol, 1)
        set_thumbs(s, no, carol, -1)
        set_thumbs(s, no, dave, -1)
        other = Conversation(kind="chat", owner=dave)
        s.add(other)
        hi = add_message(s, other, None, "user", "Hi!")
        set_thumbs(s, add_message(s, other, hi, "assistant", "Thanks!"), dave, 1)


def test_ab_choices_and_thumbs_become_weighted_pairs_counted_by_source(engine: Engine) -> None:
    users_feedback(engine)
    with session_scope(engine) as s:
        ids = feedback_ids(s)
        assert len(ids) == 5
        data = rm_data(s, [], feedback=ids)
        ab = RankingExample(prompt=JOKE, completions=["A pun.", "Knock knock."], ranking=[0, 1])
        thumbs = RankingExample(prompt=JOKE, completions=["Knock knock.", "No."], ranking=[0, 1])
        assert data.examples == [ab, thumbs]
        assert data.record["comparisons"] == {"rankings": 0, "edits": 0, "ab": 1, "thumbs": 1}
        assert data.record["feedback_ids"] == sorted(ids) and data.record["snapshot_hash"] == snapshot_hash(
            [ab, thumbs]
        )

        doubled = rm_data(s, [], feedback=ids, feedback_weight=2.0)
        assert doubled.examples == [ab, thumbs, ab, thumbs] and doubled.record["examples"] == 4
        assert doubled.record["comparisons"]["ab"] == 1  # counts are of distinct comparisons
        half = rm_data(s, [], feedback=ids, feedback_weight=0.5, seed=1)
        assert len(half.examples) == 1 and half.examples[0] in (ab, thumbs)
        assert rm_data(s, [], feedback=ids, feedback_weight=0.5, seed=1).examples == half.examples

        # a resumed run rebuilds from the ids it recorded: feedback given since then stays out
        carol = s.query(User).filter_by(name="carol").one()
        pun = s.query(Message).filter_by(content="A pun.").one()
        set_thumbs(s, pun, carol, -1)
        assert rm_data(s, [], feedback=ids).examples == [ab, thumbs]
        assert len(rm_data(s, [], feedback=feedback_ids(s)).examples) == 3  # now also knock > pun


def test_the_knobs_turn_feedback_on_with_its_weight() -> None:
    config = IterationConfig.from_knobs(IterationKnobs(rm_feedback=True, rm_feedback_weight=0.25))
    assert config.rm_feedback and config.rm_feedback_weight == 0.25
    default = IterationConfig.from_knobs(IterationKnobs())
    assert not default.rm_feedback and default.rm_feedback_weight == 1.0


@pytest.mark.e2e
def test_an_iteration_with_rm_feedback_trains_on_it_and_the_card_counts_it(
    engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    fast = SimTrainerConfig(
        suggestions=2,
        suggestion_params=SamplingParams(max_tokens=8, temperature=1.0),
        chat_params=SamplingParams(max_tokens=8, temperature=1.0),
    )
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    with session_scope(engine) as s:  # trainers chat with the base model and rank comparison tasks
        handle = PolicyHandle(model, tokenizer, ensure_base_version(s, tiny_model_dir).id)
        trainers = create_trainers(s, 3, seed=0, config=fast)
        trainers[1].chat(s, handle, generate_prompts(4, seed=0))
        create_comparison_tasks(s, handle, 4, rng=random.Random(0), overlap=2)
        rank_all(s, trainers)
    users_feedback(engine)
    quick = demo_config(tmp_path / "unused", quick=True)  # the demo's tiny budgets, in fp32
    sft, rm, ppo = (dataclasses.replace(c, precision="fp32") for c in (quick.sft, quick.rm, quick.ppo))
    card = EvalConfig(prompts=3, max_new_tokens=6, batch_size=4, progress=False)
    fields: dict[str, Any] = dict(base_model=str(tiny_model_dir), work_dir=tmp_path / "runs", sft=sft)
    fields |= dict(rm=rm, ppo=ppo, evaluate=card, progress=False, deploy=False)
    result = run_iteration(engine, IterationConfig(**fields, rm_feedback=True, rm_feedback_weight=2.0))
    assert result.stages["rm"].status == "trained"
    with session_scope(engine) as s:
        run = s.get_one(TrainingRun, result.stages["rm"].run_id)
        comparisons, examples = run.data["comparisons"], run.data["examples"]
        assert run.data["feedback_ids"] == feedback_ids(s) and run.data["feedback_weight"] == 2.0
    assert comparisons["ab"] == 1 and comparisons["thumbs"] == 1 and comparisons["rankings"] > 0
    assert examples == comparisons["rankings"] + comparisons["edits"] + 2 * 2
    assert result.report is not None and result.report["rm_comparisons"] == comparisons
    report = (result.work_dir / "report" / "report.json").read_text()
    assert '"rm_comparisons"' in report

    # new feedback alone is new data for the RM: the next iteration retrains it
    with session_scope(engine) as s:
        dave = s.query(User).filter_by(name="dave").one()
        set_thumbs(s, s.query(Message).filter_by(content="A pun.").one(), dave, 1)
    again = run_iteration(engine, IterationConfig(**fields, rm_feedback=True, rm_feedback_weight=2.0))
    assert again.stages["rm"].status == "trained"
    assert again.report is not None and again.report["rm_comparisons"]["thumbs"] == 2  # pun > no too
