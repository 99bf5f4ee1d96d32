"""Blind A/B evaluation: trainers pick the better of two model versions' replies to the same prompt.

An A/B test is one conversation (kind `imported`, source `ab`, no owner) with one root user message per
prompt. Each prompt is a `ComparisonTask` (source `ab`) with two candidates, one written by each
version, at shuffled positions; trainers see them in their own random order, labelled A and B, never
with version names, and answer with an ordinary `Ranking` (a tie when they cannot choose). The result is
version B's win rate over version A, ties counting half, with a Wilson score interval.
Functions only flush; the caller commits.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from dialoop.collect.chats import TASK_KEY
from dialoop.collect.common import check_role
from dialoop.collect.tasks import TaskView, cancel_task, next_task_for, submit_ranking
from dialoop.store.models import Candidate, ComparisonTask, Conversation, Message, ModelVersion, Ranking, User
from dialoop.store.trees import add_message

AB_SOURCE = "ab"
AB_KEY = "ab"  # Message.extra of each prompt: the versions compared ({"a": id, "b": id})
MAX_PROMPT_CHARS = 32_000


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `successes / n` (successes may be fractional: ties).

    With no observation at all, the interval is the whole of [0, 1]."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class ABPair:
    """One prompt of a test with the reply of each version."""

    prompt: str
    reply_a: str
    reply_b: str
    finished_a: bool | None = None  # the reply ended with end-of-turn
    finished_b: bool | None = None


def _policy(session: Session, ref: ModelVersion | int) -> ModelVersion:
    version = ref if isinstance(ref, ModelVersion) else session.get(ModelVersion, ref)
    if version is None:
        raise LookupError(f"no model version with id {ref}")
    if version.kind != "policy":
        raise ValueError(
            f"model version {version.name!r} is a {version.kind} model; A/B tests compare policies"
        )
    return version


def create_ab_test(
    session: Session,
    admin: User,
    version_a: ModelVersion | int,
    version_b: ModelVersion | int,
    pairs: Sequence[ABPair],
    *,
    rng: random.Random,
    overlap: int = 1,
    sampling: dict[str, Any] | None = None,
) -> Conversation:
    """Queue one two-candidate task per pair; returns the test's conversation (its id is the test id).

    `sampling` records how both versions sampled their replies; `overlap` is how many trainers judge
    each prompt. ValueError names what is wrong (same version twice, no prompts, an empty prompt)."""
    check_role(admin, ("admin",), "start A/B tests")
    a, b = _policy(session, version_a), _policy(session, version_b)
    if a.id == b.id:
        raise ValueError("an A/B test compares two different versions")
    if not pairs:
        raise ValueError("an A/B test needs at least one prompt")
    if overlap < 1:
        raise ValueError(f"overlap must be >= 1, got {overlap}")
    for i, pair in enumerate(pairs):
        if not pair.prompt.strip():
            raise ValueError(f"prompt {i + 1} is empty")
        if len(pair.prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt {i + 1} is longer than {MAX_PROMPT_CHARS} characters")
    test = Conversation(
        owner_id=None, kind="imported", source=AB_SOURCE, status="active", title=f"A/B: {a.name} vs {b.name}"
    )
    session.add(test)
    session.flush()
    for pair in pairs:
        prompt = add_message(
            session, test, None, "user", pair.prompt, extra={AB_KEY: {"a": a.id, "b": b.id, "by": admin.id}}
        )
        task = ComparisonTask(context_message_id=prompt.id, overlap=overlap, status="open", source=AB_SOURCE)
        session.add(task)
        session.flush()
        replies = [
            add_message(
                session,
                test,
                prompt,
                "assistant",
                text,
                author_model_id=version.id,
                sampling=dict(sampling or {}),
                finished=finished,
                extra={TASK_KEY: task.id},
            )
            for version, text, finished in (
                (a, pair.reply_a, pair.finished_a),
                (b, pair.reply_b, pair.finished_b),
            )
        ]
        # stored positions are shuffled too: neither the index nor the order tells which version wrote it
        for position, message in zip(rng.sample(range(2), 2), replies, strict=True):
            session.add(Candidate(task=task, index=position, message_id=message.id, is_original=False))
    session.flush()
    return test


def is_ab_task(task: ComparisonTask) -> bool:
    return task.source == AB_SOURCE


def next_ab_task(session: Session, trainer: User) -> TaskView | None:
    """The next A/B task `trainer` has not answered yet, with its two replies in their display order."""
    return next_task_for(session, trainer, source=AB_SOURCE)


def judge_ab_task(session: Session, task: ComparisonTask, trainer: User, better: int | None) -> Ranking:
    """`trainer` prefers candidate `better` (its index), or neither (None: a tie)."""
    if not is_ab_task(task):
        raise ValueError(f"comparison task {task.id} is not an A/B task")
    if task.status != "open":
        raise ValueError(f"A/B task {task.id} is {task.status}: it takes no more answers")
    indices = sorted(c.index for c in task.candidates)
    if better is None:
        return submit_ranking(session, task, trainer, indices, ties=[indices])
    if better not in indices:
        raise ValueError(f"A/B task {task.id} has candidates {indices}, not {better}")
    return submit_ranking(session, task, trainer, [better, *[i for i in indices if i != better]])


@dataclass
class ABRow:
    """One prompt of a test: both replies and how trainers judged them."""

    task_id: int
    status: str
    prompt: str
    reply_a: str
    reply_b: str
    wins_a: int = 0
    wins_b: int = 0
    ties: int = 0
    skips: int = 0


@dataclass
class ABResult:
    """Version B against version A over every judgement of the test."""

    test_id: int
    title: str
    created_at: datetime
    version_a: str
    version_b: str
    version_a_id: int
    version_b_id: int
    rows: list[ABRow] = field(default_factory=list)

    def _sum(self, name: str) -> int:
        return sum(getattr(r, name) for r in self.rows)

    @property
    def wins_a(self) -> int:
        return self._sum("wins_a")

    @property
    def wins_b(self) -> int:
        return self._sum("wins_b")

    @property
    def ties(self) -> int:
        return self._sum("ties")

    @property
    def skips(self) -> int:
        return self._sum("skips")

    @property
    def judgements(self) -> int:
        return self.wins_a + self.wins_b + self.ties

    def tasks(self, status: str) -> int:
        return sum(1 for r in self.rows if r.status == status)

    @property
    def win_rate_b(self) -> float | None:
        """How often B's reply was preferred, ties counting half; None before the first judgement."""
        n = self.judgements
        return (self.wins_b + self.ties / 2) / n if n else None

    def interval_b(self, confidence: float = 0.95) -> tuple[float, float]:
        return wilson_interval(self.wins_b + self.ties / 2, self.judgements, confidence)


def _verdict(ranking: Ranking, author_of: dict[int, int], a_id: int) -> str:
    """`a`, `b`, `tie` or `skip` for one answer to a two-candidate task."""
    if ranking.skip_reason is not None:
        return "skip"
    if not ranking.order or ranking.ties:  # tied, or "both bad" without an order
        return "tie"
    return "a" if author_of[int(ranking.order[0])] == a_id else "b"


def _result(test: Conversation, tasks: Sequence[ComparisonTask]) -> ABResult:
    roots = sorted((m for m in test.messages if m.parent_id is None), key=lambda m: m.id)
    if not roots or AB_KEY not in (roots[0].extra or {}):
        raise LookupError(f"conversation {test.id} is not an A/B test")
    versions = roots[0].extra[AB_KEY]
    a_id, b_id = int(versions["a"]), int(versions["b"])
    names = {m.author_model_id: m.author_model.name for m in test.messages if m.author_model is not None}
    result = ABResult(
        test.id,
        test.title,
        test.created_at,
        names.get(a_id, str(a_id)),
        names.get(b_id, str(b_id)),
        a_id,
        b_id,
    )
    by_context = {t.context_message_id: t for t in tasks}
    for root in roots:
        task = by_context.get(root.id)
        if task is None:
            continue
        author_of = {c.index: c.message.author_model_id or 0 for c in task.candidates}
        text_of = {c.message.author_model_id: c.message.content for c in task.candidates}
        row = ABRow(task.id, task.status, root.content, text_of.get(a_id, ""), text_of.get(b_id, ""))
        for ranking in task.rankings:
            verdict = _verdict(ranking, author_of, a_id)
            name = {"a": "wins_a", "b": "wins_b", "tie": "ties", "skip": "skips"}[verdict]
            setattr(row, name, getattr(row, name) + 1)
        result.rows.append(row)
    return result


def _tasks_of(session: Session, test_ids: Sequence[int]) -> list[ComparisonTask]:
    query = (
        select(ComparisonTask)
        .join(Message, ComparisonTask.context_message_id == Message.id)
        .where(Message.conversation_id.in_(list(test_ids)), ComparisonTask.source == AB_SOURCE)
        .options(
            selectinload(ComparisonTask.rankings),
            selectinload(ComparisonTask.candidates).selectinload(Candidate.message),
        )
    )
    return list(session.scalars(query))


def ab_result(session: Session, test_id: int) -> ABResult:
    """The current result of A/B test `test_id`; LookupError when there is no such test."""
    test = session.get(Conversation, test_id)
    if test is None or test.source != AB_SOURCE:
        raise LookupError(f"no A/B test with id {test_id}")
    return _result(test, _tasks_of(session, [test_id]))


def list_ab_tests(session: Session) -> list[ABResult]:
    """Every A/B test with its current result, newest first."""
    tests = list(
        session.scalars(
            select(Conversation)
            .where(Conversation.source == AB_SOURCE)
            .order_by(Conversation.id.desc())
            .options(selectinload(Conversation.messages).selectinload(Message.author_model))
        )
    )
    tasks = _tasks_of(session, [t.id for t in tests])  # each test picks its own by context message
    return [_result(t, tasks) for t in tests]


def close_ab_test(session: Session, test_id: int, admin: User) -> int:
    """Withdraw the test's open tasks (answers so far are kept); returns how many were withdrawn."""
    result = ab_result(session, test_id)
    closed = 0
    for row in result.rows:
        if row.status == "open":
            cancel_task(session, session.get_one(ComparisonTask, row.task_id), admin)
            closed += 1
    return closed


def recent_user_prompts(session: Session, limit: int) -> list[str]:
    """The opening user turns of the newest chats (distinct texts, newest first): real prompts."""
    query = (
        select(Message.content)
        .join(Conversation, Message.conversation_id == Conversation.id)
        .where(Conversation.kind == "chat", Message.parent_id.is_(None), Message.role == "user")
        .order_by(Message.id.desc())
    )
    prompts: list[str] = []
    for (text,) in session.execute(query.limit(limit * 4)):
        if text.strip() and text not in prompts:
            prompts.append(text)
        if len(prompts) == limit:
            break
    return prompts
