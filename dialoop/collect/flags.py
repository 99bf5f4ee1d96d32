"""Reviewing the flags trainers raise on replies (harmful, untrue, private data): open ones, resolving.

A review is stored on the flagged reply (`Message.extra["flag_review"]`) with the rankings it covered, so a
flag raised later on the same reply is open again. Functions only flush; the caller commits.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from dialoop.collect.common import check_role, context_of
from dialoop.collect.tasks import flagged_candidates
from dialoop.records import ChatMessage
from dialoop.store.models import Message, User, utcnow

REVIEW_KEY = "flag_review"
OUTCOMES = ("upheld", "dismissed")


@dataclass
class OpenFlag:
    """A flagged reply with the flags no review has covered yet."""

    message: Message
    task_id: int
    context: list[ChatMessage]
    kinds: Counter[str] = field(default_factory=Counter)  # flag kind -> how many trainers raised it
    ranking_ids: list[int] = field(default_factory=list)
    trainer_ids: list[int | None] = field(default_factory=list)


def _reviewed(message: Message) -> set[int]:
    return set((message.extra or {}).get(REVIEW_KEY, {}).get("ranking_ids", []))


def open_flags(session: Session) -> list[OpenFlag]:
    """Flagged replies with at least one flag not covered by a review, oldest flag first."""
    found: dict[int, OpenFlag] = {}
    for ranking, candidate, kinds in flagged_candidates(session):
        message = candidate.message
        if ranking.id in _reviewed(message):
            continue
        flag = found.get(message.id)
        if flag is None:
            assert message.parent is not None
            flag = found[message.id] = OpenFlag(
                message, candidate.task_id, context_of(session, message.parent)
            )
        flag.kinds.update(kinds)
        if ranking.id not in flag.ranking_ids:
            flag.ranking_ids.append(ranking.id)
            flag.trainer_ids.append(ranking.trainer_id)
    return list(found.values())


def resolve_flags(session: Session, message_id: int, admin: User, outcome: str, note: str = "") -> Message:
    """An admin closes every open flag on reply `message_id`: `upheld` (the reply is bad) or `dismissed`.

    LookupError when the reply has no open flag, ValueError on an unknown outcome."""
    check_role(admin, ("admin",), "review flags")
    if outcome not in OUTCOMES:
        raise ValueError(f"invalid outcome {outcome!r}: choose one of {', '.join(OUTCOMES)}")
    flag = next((f for f in open_flags(session) if f.message.id == message_id), None)
    if flag is None:
        raise LookupError(f"message {message_id} has no open flag")
    message = session.scalars(select(Message).where(Message.id == message_id)).one()
    covered = sorted(_reviewed(message) | set(flag.ranking_ids))
    review = {
        "outcome": outcome,
        "note": note.strip(),
        "by": admin.id,
        "at": utcnow().isoformat(timespec="seconds"),
        "kinds": dict(flag.kinds),
        "ranking_ids": covered,
    }
    message.extra = {**(message.extra or {}), REVIEW_KEY: review}  # a new dict: JSON columns track assignment
    session.flush()
    return message
