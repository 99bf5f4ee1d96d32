"""Simulated trainers run the whole collection loop through `dialoop.collect` on a tiny model."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from dialoop.collect import (
    PolicyHandle,
    create_comparison_tasks,
    demonstration_turns,
    pair_agreement,
    pairwise_agreement,
    task_view,
)
from dialoop.engine import SamplingParams
from dialoop.formats import ranking_examples_from_store
from dialoop.modeling.loading import load_model_and_tokenizer
from dialoop.sim.gold import gold_score
from dialoop.sim.prompts import generate_prompts, parse_prompt
from dialoop.sim.trainers import SimTrainerConfig, SimulatedTrainer, create_trainers, rank_all
from dialoop.store.db import session_scope
from dialoop.store.models import ComparisonTask, Conversation, Message, Ranking, User
from dialoop.store.registry import register_model_version

FAST = SimTrainerConfig(
    suggestions=3,
    suggestion_params=SamplingParams(max_tokens=12, temperature=1.0),
    chat_params=SamplingParams(max_tokens=12, temperature=1.0),
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_model_and_tokenizer(tiny_model_dir)


@pytest.mark.slow
def test_simulated_trainers_collect_demonstrations_chats_and_rankings(
    engine: Engine, tiny: tuple[Any, Any], tiny_model_dir: Path
) -> None:
    prompts = generate_prompts(24, seed=5)
    with session_scope(engine) as s:
        version = register_model_version(s, name="base", kind="policy", path=tiny_model_dir)
        handle = PolicyHandle(tiny[0], tiny[1], version.id)
        trainers = create_trainers(s, 3, seed=1, config=FAST)
        assert [t.user.role for t in trainers] == ["trainer"] * 3
        demos = [
            d for i, t in enumerate(trainers) for d in t.write_demonstrations(s, handle, prompts[i:12:3])
        ]
        chats = [c for i, t in enumerate(trainers) for c in t.chat(s, handle, prompts[12 + i :: 3])]
        tasks = create_comparison_tasks(s, handle, 100, rng=random.Random(0))
        answers = rank_all(s, trainers)

    with session_scope(engine) as s:
        # demonstrations: submitted, two turns, the reply passes the guide (repaired from a suggestion)
        assert 0 < len(demos) <= 12
        stored = list(s.scalars(select(Conversation).where(Conversation.kind == "demonstration")))
        assert {c.id for c in stored} == {d.id for d in demos}
        for demo in stored:
            user, reply = demonstration_turns(s, demo)
            assert demo.status == "submitted" and reply.author_user_id == demo.owner_id
            assert gold_score(parse_prompt(user.content), reply.content) == 1.0
            assert reply.extra["suggestion"]["model_version_id"] == version.id

        # chats: every trainer asked its prompts; each got a stored model reply
        assert len(chats) == 12
        replies = list(
            s.scalars(
                select(Message).where(Message.role == "assistant", Message.author_model_id.is_not(None))
            )
        )
        assert len([m for m in replies if "comparison_task" not in m.extra]) == 12

        # one task per chat reply, each ranked by two trainers who did not write the chat
        assert len(tasks) == 12
        assert (
            s.scalar(select(func.count()).select_from(ComparisonTask).where(ComparisonTask.status != "done"))
            == 0
        )
        assert len(answers) == 24
        for task in s.scalars(select(ComparisonTask)):
            trainer_ids = [r.trainer_id for r in task.rankings]
            assert len(trainer_ids) == 2 == len(set(trainer_ids))
            assert task.context_message.conversation.owner_id not in trainer_ids
        report = pairwise_agreement(s)
        assert report.tasks <= 12 and set(report.trainers) == {t.user.id for t in trainers}
        assert sum(t.rankings for t in report.trainers.values()) == 24

        # the RM's data says which candidates were cut off at the token limit, as the ranking page shows
        examples = ranking_examples_from_store(s)
        assert len(examples) == 24
        tasks_in_order = [
            t for t in s.scalars(select(ComparisonTask).order_by(ComparisonTask.id)) for _ in t.rankings
        ]
        cut = [[k for k, c in enumerate(t.candidates) if c.message.finished is False] for t in tasks_in_order]
        assert [e.truncated for e in examples] == cut and any(cut)


def test_noise_free_trainer_ranks_in_gold_order_and_flags_harm(
    sqlite_url: str, tiny: tuple[Any, Any]
) -> None:
    from dialoop.store.db import make_engine

    engine = make_engine(sqlite_url)
    exact = SimTrainerConfig(agreement=1.0, chat_params=SamplingParams(max_tokens=12))
    harmful = [p for p in generate_prompts(200, seed=1) if p.harmful][:2]
    with session_scope(engine) as s:
        version = register_model_version(s, name="base", kind="policy", path="tiny")
        handle = PolicyHandle(tiny[0], tiny[1], version.id)
        writer = SimulatedTrainer.create(s, "writer", config=exact)
        judge = SimulatedTrainer.create(s, "judge", config=exact)
        writer.chat(s, handle, [*harmful, *generate_prompts(4, seed=2)])
        create_comparison_tasks(s, handle, 10, rng=random.Random(3), overlap=1)
        rank_all(s, [writer, judge])
        rankings = list(s.scalars(select(Ranking)))
        assert len(rankings) == 6 and {r.trainer_id for r in rankings} == {judge.user.id}
        for r in rankings:
            view_scores, flags = judge.judge(task_view(s, r.task, judge.user))
            gold = sorted(range(4), key=lambda i: -view_scores[i])
            gold_ties = [[a, b] for a, b in itertools.pairwise(gold) if view_scores[a] == view_scores[b]]
            agreed, compared = pair_agreement((r.order, r.ties), (gold, gold_ties))
            assert agreed == compared
            assert r.all_bad == (max(view_scores) <= 0)
            assert r.flags == {str(i): kinds for i, kinds in flags.items()}
        prompts = [parse_prompt(r.task.context_message.content) for r in rankings]
        assert sum(p.harmful for p in prompts) == 2
        # a random tiny model never refuses: every reply to a harmful prompt is flagged
        assert all(len(r.flags) == 4 for r, p in zip(rankings, prompts, strict=True) if p.harmful)
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(User)) == 2
    engine.dispose()


def test_a_trainer_name_taken_by_another_role_is_refused(sqlite_url: str) -> None:
    from dialoop.store.accounts import create_user
    from dialoop.store.db import make_engine

    engine = make_engine(sqlite_url)
    with session_scope(engine) as s:
        create_user(s, "root", "admin", "pw")
        with pytest.raises(ValueError, match="role admin, not trainer"):
            SimulatedTrainer.create(s, "root")
        first = SimulatedTrainer.create(s, "sim-1")
        assert SimulatedTrainer.create(s, "sim-1").user is first.user
    engine.dispose()


def test_multi_turn_chats_abandoned_drafts_and_skips(sqlite_url: str, tiny: tuple[Any, Any]) -> None:
    from dialoop.store.db import make_engine

    engine = make_engine(sqlite_url)
    picky = SimTrainerConfig(
        suggestions=2,
        suggestion_params=SamplingParams(max_tokens=8),
        chat_params=SamplingParams(max_tokens=8),
        min_demo_score=2.0,  # above the best possible score: every draft is abandoned
        skip_rate=1.0,
    )
    with session_scope(engine) as s:
        version = register_model_version(s, name="base", kind="policy", path="tiny")
        handle = PolicyHandle(tiny[0], tiny[1], version.id)
        ann, bob = (SimulatedTrainer.create(s, n, config=picky) for n in ("ann", "bob"))
        assert ann.write_demonstrations(s, handle, generate_prompts(3, seed=0)) == []
        assert s.scalar(select(func.count()).select_from(Conversation)) == 0
        prompts = generate_prompts(4, seed=1)
        with pytest.raises(ValueError, match="do not make chats of 3 turn"):
            ann.chat(s, handle, prompts, turns=3)
        chats = ann.chat(s, handle, prompts, turns=2)
        assert len(chats) == 2
        for chat, pair in zip(chats, [prompts[:2], prompts[2:]], strict=True):
            messages = sorted(chat.messages, key=lambda m: m.id)
            assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
            assert [m.content for m in messages[::2]] == [p.text for p in pair]
            assert [m.parent_id for m in messages[1:]] == [m.id for m in messages[:-1]]
        tasks = create_comparison_tasks(s, handle, 10, rng=random.Random(0))
        assert len(tasks) == 4  # both model replies of each chat start a task
        answers = rank_all(s, [ann, bob])
        assert len(answers) == 4 and all(a.skip_reason and a.trainer_id == bob.user.id for a in answers)
        assert all(t.status == "open" for t in tasks)
    engine.dispose()
