"""Row counts of the store, as `dialoop stats` prints them."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dialoop.store.models import (
    Base,
    ComparisonTask,
    Conversation,
    Feedback,
    Message,
    ModelVersion,
    Ranking,
    TrainingRun,
    User,
)

COUNTED: dict[str, type[Base]] = {
    "users": User,
    "conversations": Conversation,
    "messages": Message,
    "comparison_tasks": ComparisonTask,
    "rankings": Ranking,
    "feedback": Feedback,
    "model_versions": ModelVersion,
    "training_runs": TrainingRun,
}


def store_stats(session: Session) -> dict[str, int]:
    """How many rows each table holds, read in one query (one consistent snapshot)."""
    counts = [select(func.count()).select_from(cls).scalar_subquery().label(k) for k, cls in COUNTED.items()]
    row = session.execute(select(*counts)).one()
    return {key: int(row._mapping[key]) for key in COUNTED}
