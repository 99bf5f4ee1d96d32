"""The store: SQLAlchemy models, sessions and migrations."""

from dialoop.store.db import make_engine, session_scope
from dialoop.store.models import (
    ApiKey,
    Base,
    Candidate,
    ComparisonTask,
    Conversation,
    Feedback,
    Message,
    ModelVersion,
    Ranking,
    TrainingRun,
    User,
)

__all__ = [
    "ApiKey",
    "Base",
    "Candidate",
    "ComparisonTask",
    "Conversation",
    "Feedback",
    "Message",
    "ModelVersion",
    "Ranking",
    "TrainingRun",
    "User",
    "make_engine",
    "session_scope",
]
