"""Users' feedback in the store: A/B choices between two sibling replies and thumbs on a reply.

The queries the loop and the exports build preference pairs from (`dialoop.formats.store_io`); `ids`
restricts each to the feedback rows an earlier run used, so that a resumed run rebuilds the same data.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from dialoop.store.models import Feedback

FEEDBACK_KINDS = ("ab", "thumbs")


def _only(query: Select, ids: Sequence[int] | None) -> Select:  # type: ignore[type-arg]
    return query if ids is None else query.where(Feedback.id.in_(list(ids)))


def feedback_ids(session: Session) -> list[int]:
    """Ids of every A/B choice and thumb, oldest first."""
    query = select(Feedback.id).where(Feedback.kind.in_(FEEDBACK_KINDS)).order_by(Feedback.id)
    return list(session.scalars(query))


def ab_choices(session: Session, ids: Sequence[int] | None = None) -> list[Feedback]:
    """The A/B choices (of `ids`, when given), oldest first: `message_id` was preferred to
    `other_message_id`."""
    query = select(Feedback).where(Feedback.kind == "ab").order_by(Feedback.id)
    return list(session.scalars(_only(query, ids)))


def net_thumbs(session: Session, ids: Sequence[int] | None = None) -> dict[int, int]:
    """Each thumbed message's net vote (ups minus downs, of `ids` when given); messages netting 0 left out."""
    query = (
        select(Feedback.message_id, func.sum(Feedback.value))
        .where(Feedback.kind == "thumbs")
        .group_by(Feedback.message_id)
    )
    return {message_id: int(total) for message_id, total in session.execute(_only(query, ids)) if total}
