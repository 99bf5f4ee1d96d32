"""Comparison tasks: K replies to one context from trainer chats, ranked by `overlap` different trainers.

A task starts from a model-written message of a trainer chat chosen at random among those not used
yet; K-1 alternatives are sampled for the same context and stored as its siblings. A task is `open`
until it has `overlap` rankings (skips do not count), then `done`. Functions only flush; the caller commits.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from dialoop.collect.chats import TASK_KEY
from dialoop.collect.common import (
    PolicyHandle,
    check_role,
    context_of,
    params_from_record,
    sample_for,
    sampling_record,
)
from dialoop.engine import SamplingParams
from dialoop.modeling.chat import Reply
from dialoop.records import ChatMessage
from dialoop.settings import TrainerSettings
from dialoop.store.models import (
    TRAINER_ROLES,
    Candidate,
    ComparisonTask,
    Conversation,
    Message,
    Ranking,
    User,
)
from dialoop.store.trees import add_message

log = logging.getLogger(__name__)

DEFAULT_K = TrainerSettings().k
DEFAULT_OVERLAP = TrainerSettings().overlap
CHAT_SOURCE = "chat"  # tasks made from model-written messages of trainer chats
FLAG_KINDS = ("harmful", "untrue", "private_data")
_SEED_RANGE = 2**31


@dataclass
class TaskView:
    """What a trainer sees of a task: the context and the candidates in their own display order."""

    task: ComparisonTask
    context: list[ChatMessage]
    candidates: list[Candidate]  # display order for this trainer; rank by `Candidate.index`


def eligible_originals(session: Session) -> list[tuple[int, int]]:
    """(message id, context id) of model-written replies in trainer chats whose context has no task."""
    owner = aliased(User)
    used = select(ComparisonTask.context_message_id)
    query = (
        select(Message.id, Message.parent_id)
        .join(Conversation, Message.conversation_id == Conversation.id)
        .join(owner, Conversation.owner_id == owner.id)
        .where(
            Conversation.kind == "chat",
            owner.role.in_(TRAINER_ROLES),
            Message.role == "assistant",
            Message.author_model_id.is_not(None),
            Message.parent_id.is_not(None),
            Message.parent_id.not_in(used),
        )
        .order_by(Message.id)
    )
    return [(m, p) for m, p in session.execute(query) if p is not None]


def create_comparison_tasks(
    session: Session,
    handle: PolicyHandle,
    count: int,
    *,
    rng: random.Random,
    k: int = DEFAULT_K,
    overlap: int = DEFAULT_OVERLAP,
    params: SamplingParams | None = None,
    alt_models: Sequence[PolicyHandle] = (),
) -> list[ComparisonTask]:
    """Up to `count` new tasks (fewer when trainer chats run out), their alternatives sampled in batches.

    Alternatives come from `handle` and `alt_models` in turn; by default they use the original reply's
    sampling parameters with fresh seeds drawn from `rng`, so a seeded `rng` makes tasks reproducible.
    """
    if k < 2:
        raise ValueError(f"a comparison needs k >= 2 candidates, got {k}")
    if overlap < 1:
        raise ValueError(f"overlap must be >= 1, got {overlap}")
    eligible = eligible_originals(session)
    rng.shuffle(eligible)
    picked: list[Message] = []
    contexts_taken: set[int] = set()
    for message_id, context_id in eligible:
        if len(picked) == count:
            break
        if context_id not in contexts_taken:  # regenerations share a context: one task per context
            contexts_taken.add(context_id)
            picked.append(session.get_one(Message, message_id))
    handles = list({id(h): h for h in [handle, *alt_models]}.values())
    jobs: list[tuple[int, PolicyHandle, SamplingParams]] = []  # (task number, model, params)
    for t, original in enumerate(picked):
        base = params or params_from_record(original.sampling or {})
        if base.temperature == 0:  # greedy alternatives would all repeat one reply: nothing to compare
            base = dataclasses.replace(base, temperature=1.0)
        for j in range(k - 1):
            seed = rng.randrange(_SEED_RANGE)
            jobs.append((t, handles[j % len(handles)], dataclasses.replace(base, seed=seed)))
    chats = [context_of(session, m.parent) for m in picked if m.parent is not None]
    texts: dict[int, Reply] = {}
    for h in handles:
        mine = [i for i, (_, jh, _) in enumerate(jobs) if jh is h]
        replies = sample_for(h, [chats[jobs[i][0]] for i in mine], [jobs[i][2] for i in mine])
        texts.update(zip(mine, replies, strict=True))
    tasks = []
    for t, original in enumerate(picked):
        context = original.parent
        assert context is not None
        task = ComparisonTask(
            context_message_id=context.id, overlap=overlap, status="open", source=CHAT_SOURCE
        )
        session.add(task)
        session.flush()
        messages = [original]
        for i, (jt, jh, p) in enumerate(jobs):
            if jt == t:
                reply = texts[i]
                messages.append(
                    add_message(
                        session,
                        original.conversation,
                        context,
                        "assistant",
                        reply.text,
                        author_model_id=jh.version_id,
                        sampling=sampling_record(p),
                        finished=reply.finished,
                        extra={TASK_KEY: task.id},
                    )
                )
        # stored positions are shuffled too, so no export or view can leak which reply is the original
        positions = rng.sample(range(k), k)
        for pos, m in zip(positions, messages, strict=True):
            session.add(Candidate(task=task, index=pos, message_id=m.id, is_original=m is original))
        session.flush()
        tasks.append(task)
    log.info("created %d comparison tasks (k=%d, overlap=%d)", len(tasks), k, overlap)
    return tasks


def create_comparison_task(
    session: Session,
    handle: PolicyHandle,
    *,
    rng: random.Random,
    k: int = DEFAULT_K,
    overlap: int = DEFAULT_OVERLAP,
    params: SamplingParams | None = None,
    alt_models: Sequence[PolicyHandle] = (),
) -> ComparisonTask | None:
    """One new task from a random unused model-written message of a trainer chat; None when there is none."""
    tasks = create_comparison_tasks(
        session, handle, 1, rng=rng, k=k, overlap=overlap, params=params, alt_models=alt_models
    )
    return tasks[0] if tasks else None


def display_order(task: ComparisonTask, trainer: User) -> list[Candidate]:
    """The task's candidates in the order `trainer` sees them: shuffled, the same every time for them."""
    candidates = sorted(task.candidates, key=lambda c: c.index)  # in-memory lists keep insertion order
    random.Random(f"display:{task.id}:{trainer.id}").shuffle(candidates)
    return candidates


def task_view(session: Session, task: ComparisonTask, trainer: User) -> TaskView:
    """The context and candidates of `task` as `trainer` sees them."""
    return TaskView(task, context_of(session, task.context_message), display_order(task, trainer))


def _counted_rankings(task: ComparisonTask) -> int:
    return sum(1 for r in task.rankings if r.skip_reason is None)


def next_task_for(session: Session, trainer: User, *, source: str | None = None) -> TaskView | None:
    """An open task for `trainer`: not answered (ranked or skipped) by them, not from their own chat.

    Tasks closest to their overlap come first, then the oldest, so tasks get finished. `source` keeps
    only the tasks of that source (e.g. "ab": blind A/B comparisons).
    """
    check_role(trainer, TRAINER_ROLES, "rank comparison tasks")
    answered = select(Ranking.task_id).where(Ranking.trainer_id == trainer.id)
    counted = (
        select(func.count(Ranking.id))
        .where(Ranking.task_id == ComparisonTask.id, Ranking.skip_reason.is_(None))
        .correlate(ComparisonTask)
        .scalar_subquery()
    )
    query = (
        select(ComparisonTask)
        .join(Message, ComparisonTask.context_message_id == Message.id)
        .join(Conversation, Message.conversation_id == Conversation.id)
        .where(
            ComparisonTask.status == "open",
            ComparisonTask.id.not_in(answered),
            (Conversation.owner_id != trainer.id) | Conversation.owner_id.is_(None),
            counted < ComparisonTask.overlap,
        )
        .order_by(counted.desc(), ComparisonTask.id)
        .limit(1)
    )
    if source is not None:
        query = query.where(ComparisonTask.source == source)
    task = session.scalars(query).first()
    return task_view(session, task, trainer) if task is not None else None


def _check_may_answer(task: ComparisonTask, trainer: User) -> None:
    check_role(trainer, TRAINER_ROLES, "rank comparison tasks")
    if task.status == "cancelled":
        raise ValueError(f"comparison task {task.id} is cancelled")
    if task.context_message.conversation.owner_id == trainer.id:
        raise PermissionError(f"comparison task {task.id} comes from {trainer.name}'s own chat")


def _validate_flags(flags: Mapping[int, Sequence[str]] | None, k: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for index, kinds in (flags or {}).items():
        if not isinstance(index, int) or not 0 <= index < k:
            raise ValueError(f"flags name candidate {index!r}; candidates are 0..{k - 1}")
        bad = [kind for kind in kinds if kind not in FLAG_KINDS]
        if bad:
            raise ValueError(
                f"unknown flag(s) {bad} on candidate {index}: choose from {', '.join(FLAG_KINDS)}"
            )
        if kinds:
            out[str(index)] = sorted(set(kinds))
    return out


def _validate_ranking(
    order: Sequence[int], ties: Sequence[Sequence[int]], all_bad: bool, k: int
) -> tuple[list[int], list[list[int]]]:
    order = list(order)
    if not (all_bad and not order) and sorted(order) != list(range(k)):
        raise ValueError(
            f"order must list each candidate index 0..{k - 1} exactly once, best first; got {order}"
            + (" (or be empty when all replies are bad)" if all_bad else "")
        )
    position = {c: i for i, c in enumerate(order)}
    pairs: list[list[int]] = []
    for tie in ties:
        tie = list(tie)
        if len(tie) != 2 or tie[0] == tie[1]:
            raise ValueError(f"a tie is a pair of two different candidate indices; got {tie}")
        a, b = tie
        if a not in position or b not in position:
            raise ValueError(f"tie {tie} names a candidate that is not in the order {order}")
        if abs(position[a] - position[b]) != 1:
            raise ValueError(f"tie {tie}: only candidates next to each other in the order can be tied")
        pair = sorted((a, b), key=position.__getitem__)
        if pair in pairs:
            raise ValueError(f"tie {tie} is given twice")
        pairs.append(pair)
    pairs.sort(key=lambda p: position[p[0]])
    return order, pairs


def _answer(session: Session, task: ComparisonTask, trainer: User, **fields: Any) -> Ranking:
    """Record (or replace: trainers may edit their answers) `trainer`'s answer, then update the status."""
    ranking = next((r for r in task.rankings if r.trainer_id == trainer.id), None)
    if ranking is None:
        ranking = Ranking(task=task, trainer_id=trainer.id)
        session.add(ranking)
    for name, value in fields.items():
        setattr(ranking, name, value)
    if task.status != "cancelled":
        task.status = "done" if _counted_rankings(task) >= task.overlap else "open"
    session.flush()
    return ranking


def answers_of(session: Session, trainer: User, limit: int = 500) -> list[Ranking]:
    """The trainer's rankings and skips, newest first."""
    query = select(Ranking).where(Ranking.trainer_id == trainer.id).order_by(Ranking.id.desc()).limit(limit)
    return list(session.scalars(query))


def submit_ranking(
    session: Session,
    task: ComparisonTask,
    trainer: User,
    order: Sequence[int],
    ties: Sequence[Sequence[int]] = (),
    all_bad: bool = False,
    flags: Mapping[int, Sequence[str]] | None = None,
) -> Ranking:
    """`trainer`'s ranking: candidate indices best first, ties of neighbours, all-bad, flags per candidate.

    `order` is a permutation of the candidate indices (it may be empty when `all_bad`); ValueError says
    what is wrong. Answering again replaces the trainer's earlier ranking or skip.
    """
    _check_may_answer(task, trainer)
    k = len(task.candidates)
    clean_order, clean_ties = _validate_ranking(order, ties, all_bad, k)
    clean_flags = _validate_flags(flags, k)
    return _answer(
        session,
        task,
        trainer,
        order=clean_order,
        ties=clean_ties,
        all_bad=all_bad,
        flags=clean_flags,
        skip_reason=None,
    )


def skip_task(
    session: Session,
    task: ComparisonTask,
    trainer: User,
    reason: str,
    flags: Mapping[int, Sequence[str]] | None = None,
) -> Ranking:
    """`trainer` skips `task` with a reason (required); they are not offered it again; flags are kept."""
    _check_may_answer(task, trainer)
    if not reason.strip():
        raise ValueError("a skip needs a reason")
    clean_flags = _validate_flags(flags, len(task.candidates))
    return _answer(
        session,
        task,
        trainer,
        order=[],
        ties=[],
        all_bad=False,
        flags=clean_flags,
        skip_reason=reason.strip(),
    )


def cancel_task(session: Session, task: ComparisonTask, admin: User) -> None:
    """An admin withdraws a task: nobody is offered it any more; its answers are kept."""
    check_role(admin, ("admin",), "cancel comparison tasks")
    task.status = "cancelled"
    session.flush()


def flagged_candidates(session: Session) -> list[tuple[Ranking, Candidate, list[str]]]:
    """Every flag trainers raised, as (ranking, flagged candidate, flag kinds), oldest first."""
    out: list[tuple[Ranking, Candidate, list[str]]] = []
    for ranking in session.scalars(select(Ranking).order_by(Ranking.id)):
        if not ranking.flags:
            continue
        by_index = {c.index: c for c in ranking.task.candidates}
        out.extend((ranking, by_index[int(i)], list(kinds)) for i, kinds in ranking.flags.items())
    return out
