"""SQLAlchemy 2 tables: users, message trees, comparison tasks, rankings, feedback, models, runs, and the
web server's shared state (ended sessions, login failures, admin jobs)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("admin", "trainer", "user")
TRAINER_ROLES = ("trainer", "admin")  # who writes demonstrations and ranks; whose chats feed tasks
CONVERSATION_KINDS = ("demonstration", "chat", "imported")
MESSAGE_ROLES = ("system", "user", "assistant")


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def utc_iso(value: datetime | None) -> str | None:
    """A stored (naive UTC) time as ISO 8601 with a `Z`, for JSON."""
    return value.isoformat() + "Z" if value is not None else None


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="user", cascade="all, delete-orphan")


class ApiKey(Base):
    """An API key for `/v1`; only its SHA-256 is stored, `prefix` identifies it in listings."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)

    user: Mapped[User] = relationship(back_populates="api_keys")


class TrainingRun(Base):
    """One training stage: its config, exactly which data it used, status, metrics, checkpoints."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    stage: Mapped[str] = mapped_column(String(8))  # sft | rm | ppo
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)  # ids used and a snapshot hash
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|running|done|failed
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    run_dir: Mapped[str] = mapped_column(Text, default="")
    iteration: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ModelVersion(Base):
    """A model the project can serve or score with: a standard HF directory and its lineage."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # policy | reward
    path: Mapped[str] = mapped_column(Text)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), default=None)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"), default=None)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    served: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    parent: Mapped[ModelVersion | None] = relationship(remote_side="ModelVersion.id")
    run: Mapped[TrainingRun | None] = relationship()


class Conversation(Base):
    """A tree of messages owned by a user: a demonstration, a chat, or imported data."""

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    title: Mapped[str] = mapped_column(String(300), default="")
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    # demonstrations: draft -> submitted -> accepted (or rejected); chats: active
    status: Mapped[str] = mapped_column(String(16), default="active")
    source: Mapped[str] = mapped_column(String(32), default="")  # "" | import format name
    content_hash: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    owner: Mapped[User | None] = relationship()
    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation", cascade="all, delete-orphan", order_by="Message.id"
    )


class Message(Base):
    """A node of a conversation tree; siblings (same parent) are edits or regenerations."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    author_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    author_model_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    sampling: Mapped[dict[str, Any]] = mapped_column(default=dict)  # temperature, top_p, max_tokens, seed
    finished: Mapped[bool | None] = mapped_column(Boolean, default=None)  # model replies: ended with EOS
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)  # e.g. OASST ids, lang, review state
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")
    parent: Mapped[Message | None] = relationship(remote_side="Message.id")
    author_model: Mapped[ModelVersion | None] = relationship()


class ComparisonTask(Base):
    """K candidate replies to one context; `context_message_id` is the last message of the context."""

    __tablename__ = "comparison_tasks"

    id: Mapped[int] = mapped_column(primary_key=True)
    context_message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    overlap: Mapped[int] = mapped_column(Integer, default=1)  # how many rankings it wants
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | done | cancelled
    source: Mapped[str] = mapped_column(String(32), default="")
    content_hash: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    context_message: Mapped[Message] = relationship()
    candidates: Mapped[list[Candidate]] = relationship(
        back_populates="task", cascade="all, delete-orphan", order_by="Candidate.index"
    )
    rankings: Mapped[list[Ranking]] = relationship(
        back_populates="task", cascade="all, delete-orphan", order_by="Ranking.id"
    )


class Candidate(Base):
    """One of a task's K replies, stored as a message (a sibling under the context) with its author."""

    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("task_id", "index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("comparison_tasks.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    is_original: Mapped[bool] = mapped_column(Boolean, default=False)  # the model-written message picked

    task: Mapped[ComparisonTask] = relationship(back_populates="candidates")
    message: Mapped[Message] = relationship()


class Ranking(Base):
    """A trainer's answer to a task: order best..worst (candidate indices), ties, all-bad, flags, skip."""

    __tablename__ = "rankings"

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("comparison_tasks.id", ondelete="CASCADE"), index=True)
    trainer_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    order: Mapped[list[Any]] = mapped_column(default=list)  # candidate indices, best first
    ties: Mapped[list[Any]] = mapped_column(default=list)  # [[i, j], ...] pairs judged equal
    all_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    flags: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"<index>": ["harmful", ...]}
    skip_reason: Mapped[str | None] = mapped_column(Text, default=None)  # set => skipped, no order
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    task: Mapped[ComparisonTask] = relationship(back_populates="rankings")


class Feedback(Base):
    """A user's judgement of an assistant message: thumbs (+1/-1) or an A/B choice over a sibling."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(8))  # thumbs | ab
    value: Mapped[int] = mapped_column(Integer, default=0)  # thumbs: +1 / -1; ab: 1
    # ab: message_id is the preferred reply, other_message_id the sibling it was compared with
    other_message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    score: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class RevokedSession(Base):
    """A web session id that was ended (logout, login rotation) before its cookie would expire."""

    __tablename__ = "revoked_sessions"

    sid: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)  # after it the cookie is dead anyway


class LoginFailure(Base):
    """A failed login: by name, by client (the device cookie's id, else the address) and by address."""

    __tablename__ = "login_failures"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)  # lower-cased, as typed (may be no user)
    client: Mapped[str] = mapped_column(String(64))  # "device:<id>" or "ip:<address>"
    ip: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)


class KnownLogin(Base):
    """An address a user has logged in from: failures of others elsewhere do not slow them down there."""

    __tablename__ = "known_logins"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    ip: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AdminJob(Base):
    """A job started from the admin pages (an iteration): its settings, owner process and outcome."""

    __tablename__ = "admin_jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="iterate")
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    started_by: Mapped[str] = mapped_column(String(100))
    log_path: Mapped[str] = mapped_column(Text)
    # running | done | failed | cancelled | interrupted (the server stopped while it ran)
    status: Mapped[str] = mapped_column(String(16), default="running", index=True)
    pid: Mapped[int | None] = mapped_column(Integer, default=None)  # the child's process (group)
    host: Mapped[str] = mapped_column(String(255), default="")
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)  # the owning server is alive
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    returncode: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    iteration: Mapped[int | None] = mapped_column(Integer, default=None)
    policy_version: Mapped[str | None] = mapped_column(String(200), default=None)
    served: Mapped[bool] = mapped_column(Boolean, default=False)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    resumed_from: Mapped[int | None] = mapped_column(Integer, default=None)
