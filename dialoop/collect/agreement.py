"""Inter-trainer agreement on overlapping tasks, what each trainer has done, and collection counts."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from dialoop.collect.chats import DELETED
from dialoop.collect.tasks import eligible_originals
from dialoop.store.models import ComparisonTask, Conversation, Ranking, User


def tie_groups(order: Sequence[int], ties: Sequence[Sequence[int]]) -> dict[int, int]:
    """Candidate -> rank level: tied neighbours share a level, a chain of ties is one level."""
    tied = {(int(a), int(b)) for a, b in ties} | {(int(b), int(a)) for a, b in ties}
    level: dict[int, int] = {}
    current = -1
    for i, c in enumerate(order):
        if i == 0 or (order[i - 1], c) not in tied:
            current += 1
        level[c] = current
    return level


def pair_agreement(
    a: tuple[Sequence[int], Sequence[Sequence[int]]], b: tuple[Sequence[int], Sequence[Sequence[int]]]
) -> tuple[int, int]:
    """(pairs ordered the same, pairs compared) for two (order, ties) over the same candidates.

    A pair is compared when both orders contain it and neither ties it.
    """
    level_a, level_b = tie_groups(*a), tie_groups(*b)
    agreed = compared = 0
    for x, y in itertools.combinations(sorted(set(level_a) & set(level_b)), 2):
        da, db = level_a[x] - level_a[y], level_b[x] - level_b[y]
        if da == 0 or db == 0:
            continue
        compared += 1
        agreed += (da > 0) == (db > 0)
    return agreed, compared


@dataclass
class TrainerStats:
    """One trainer's answers and their agreement with the other trainers on shared tasks."""

    trainer_id: int
    name: str
    rankings: int = 0  # answers with an order (all-bad included), skips excluded
    skips: int = 0
    all_bad: int = 0
    flagged: int = 0  # answers that flag at least one candidate
    agreed_pairs: int = 0
    compared_pairs: int = 0

    @property
    def agreement(self) -> float | None:
        return self.agreed_pairs / self.compared_pairs if self.compared_pairs else None


@dataclass
class AgreementReport:
    """Pairwise agreement between trainers over tasks that two or more of them ranked."""

    agreed_pairs: int = 0
    compared_pairs: int = 0
    tasks: int = 0  # tasks with at least two comparable rankings
    trainers: dict[int, TrainerStats] = field(default_factory=dict)

    @property
    def agreement(self) -> float | None:
        return self.agreed_pairs / self.compared_pairs if self.compared_pairs else None


def _comparable(r: Ranking) -> bool:
    return r.skip_reason is None and not r.all_bad and bool(r.order)


def pairwise_agreement(session: Session) -> AgreementReport:
    """Fraction of candidate pairs two trainers ordered the same way (ties and all-bad answers excluded)."""
    report = AgreementReport()
    names: dict[int, str] = {i: n for i, n in session.execute(select(User.id, User.name))}
    for r in session.scalars(select(Ranking).where(Ranking.trainer_id.is_not(None)).order_by(Ranking.id)):
        assert r.trainer_id is not None
        stats = report.trainers.setdefault(
            r.trainer_id, TrainerStats(r.trainer_id, names.get(r.trainer_id, ""))
        )
        if r.skip_reason is not None:
            stats.skips += 1
        else:
            stats.rankings += 1
            stats.all_bad += r.all_bad
        stats.flagged += bool(r.flags)
    tasks = session.scalars(select(ComparisonTask).options(selectinload(ComparisonTask.rankings)))
    for task in tasks:
        ranked = [r for r in task.rankings if _comparable(r) and r.trainer_id is not None]
        if len({r.trainer_id for r in ranked}) < 2:
            continue
        report.tasks += 1
        for x, y in itertools.combinations(ranked, 2):
            if x.trainer_id == y.trainer_id:
                continue
            agreed, compared = pair_agreement((x.order, x.ties), (y.order, y.ties))
            report.agreed_pairs += agreed
            report.compared_pairs += compared
            for r in (x, y):
                assert r.trainer_id is not None
                report.trainers[r.trainer_id].agreed_pairs += agreed
                report.trainers[r.trainer_id].compared_pairs += compared
    return report


def collection_counts(session: Session) -> dict[str, int]:
    """Demonstrations by status, chats, and comparison tasks by status, for the admin dashboard."""
    counts: dict[str, int] = {}
    by_kind = select(Conversation.kind, Conversation.status, func.count()).group_by(
        Conversation.kind, Conversation.status
    )
    for kind, status, n in session.execute(by_kind):
        key = f"demonstrations_{status}" if kind == "demonstration" else f"{kind}s"
        counts[key] = counts.get(key, 0) + n
    tasks = select(ComparisonTask.status, func.count()).group_by(ComparisonTask.status)
    for status, n in session.execute(tasks):
        counts[f"tasks_{status}"] = n
    return counts


def trainer_counts(session: Session, trainer: User) -> dict[str, int]:
    """One trainer's demonstrations by status, chats, rankings and skips, and the work waiting for anyone."""
    counts = {f"demonstrations_{s}": 0 for s in ("draft", "submitted", "accepted", "rejected")}
    rows = session.execute(
        select(Conversation.status, func.count())
        .where(Conversation.owner_id == trainer.id, Conversation.kind == "demonstration")
        .group_by(Conversation.status)
    )
    for status, n in rows:
        counts[f"demonstrations_{status}"] = n
    counts["chats"] = (
        session.scalar(
            select(func.count())
            .select_from(Conversation)
            .where(
                Conversation.owner_id == trainer.id,
                Conversation.kind == "chat",
                Conversation.status != DELETED,
            )
        )
        or 0
    )
    skipped = Ranking.skip_reason.is_not(None)
    answers = session.execute(
        select(skipped, func.count()).where(Ranking.trainer_id == trainer.id).group_by(skipped)
    )
    by_kind = {bool(k): n for k, n in answers}
    counts["ranked"], counts["skipped"] = by_kind.get(False, 0), by_kind.get(True, 0)
    counts["replies_waiting"] = len(eligible_originals(session))
    counts["tasks_open"] = (
        session.scalar(
            select(func.count()).select_from(ComparisonTask).where(ComparisonTask.status == "open")
        )
        or 0
    )
    return counts
