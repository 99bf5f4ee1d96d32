"""A small store for the admin tests: trainers' demonstrations, chats, comparison tasks and rankings.

Written through `dialoop.collect` on a tiny model, so everything the dashboard counts and the iteration
trains on is real: two trainers rank the same tasks (agreement), one flags a reply, one skips.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from dialoop.collect import (
    PolicyHandle,
    add_turn,
    add_user_turn,
    create_comparison_tasks,
    create_demonstration,
    generate_chat_replies,
    skip_task,
    start_chat,
    submit_demonstration,
    submit_ranking,
)
from dialoop.engine import SamplingParams
from dialoop.modeling import load_model_and_tokenizer
from dialoop.store.accounts import create_user, get_user
from dialoop.store.db import session_scope
from dialoop.store.models import User
from dialoop.store.registry import ensure_base_version

PROMPTS = [
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "What is 2 + 3?",
    "Say hello in French.",
    "Give me a word that rhymes with cat.",
    "List two fruits.",
]


@dataclass
class Seeded:
    """Ids of what `seed_store` wrote."""

    base_version_id: int
    demonstrations: list[int] = field(default_factory=list)
    submitted: list[int] = field(default_factory=list)
    tasks: list[int] = field(default_factory=list)
    rankings: int = 0
    flagged_task: int | None = None


def _trainer(session: object, name: str) -> User:
    from sqlalchemy.orm import Session

    assert isinstance(session, Session)
    user = get_user(session, name)
    return user if user is not None else create_user(session, name, "trainer", "a trainer's password")


def seed_store(engine: Engine, model_dir: Path, *, trainers: tuple[str, str] = ("tess", "theo")) -> Seeded:
    """Demonstrations (4 submitted, 1 draft), 4 chats, 3 tasks (K=3): 2 ranked (one flag), 1 skipped."""
    model, tokenizer = load_model_and_tokenizer(model_dir)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=1)
    with session_scope(engine) as session:
        base = ensure_base_version(session, model_dir)
        handle = PolicyHandle(model, tokenizer, base.id)
        first, second = (_trainer(session, n) for n in trainers)
        seeded = Seeded(base.id)
        for i, prompt in enumerate(PROMPTS[:5]):
            demo = create_demonstration(session, first if i % 2 else second)
            add_turn(session, demo, demo.owner, "user", prompt)  # type: ignore[arg-type]
            add_turn(session, demo, demo.owner, "assistant", f"A careful answer number {i}.")  # type: ignore[arg-type]
            if i < 4:
                submit_demonstration(session, demo, demo.owner)  # type: ignore[arg-type]
                seeded.submitted.append(demo.id)
            seeded.demonstrations.append(demo.id)
        # chats by the first trainer: the second one ranks their tasks, and the admin too
        asked = []
        for prompt in PROMPTS[:4]:
            chat = start_chat(session, first)
            asked.append(add_user_turn(session, chat, first, prompt))
        generate_chat_replies(session, handle, asked, params)
        tasks = create_comparison_tasks(session, handle, 3, rng=random.Random(0), k=3, overlap=2)
        seeded.tasks = [t.id for t in tasks]
        ranker = second
        for n, task in enumerate(tasks):
            order = [c.index for c in task.candidates]
            if n == 2:
                skip_task(session, task, ranker, "I cannot tell them apart")
                continue
            flags = {order[0]: ["untrue"]} if n == 0 else None
            submit_ranking(session, task, ranker, order, flags=flags)
            seeded.rankings += 1
            if n == 0:
                seeded.flagged_task = task.id
        return seeded


def add_second_ranker(engine: Engine, task_ids: list[int], name: str, *, agree: bool) -> None:
    """Another trainer ranks `task_ids`: the same order as the first ranker (agree) or its reverse."""
    from dialoop.store.models import ComparisonTask

    with session_scope(engine) as session:
        user = _trainer(session, name)
        for task_id in task_ids:
            task = session.get_one(ComparisonTask, task_id)
            first = next(r for r in task.rankings if r.skip_reason is None)
            order = list(first.order) if agree else list(reversed(first.order))
            submit_ranking(session, task, user, order)
