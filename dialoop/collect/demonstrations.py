"""Demonstrations: a trainer writes both sides of a conversation, helped by model-written suggestions.

Life of a demonstration: draft -> submitted -> accepted | rejected. Its owner edits it until it is
accepted (editing a rejected one makes it a draft again); an admin accepts or rejects submitted ones.
A demonstration is one path of turns, user first, alternating. Functions only flush; the caller commits.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from dialoop.collect.common import (
    PolicyHandle,
    check_role,
    context_of,
    require_owner,
    sample_for,
    sampling_record,
)
from dialoop.engine import SamplingParams
from dialoop.store.models import TRAINER_ROLES, Conversation, Message, User
from dialoop.store.trees import add_message

log = logging.getLogger(__name__)

DEMONSTRATION_STATUSES = ("draft", "submitted", "accepted", "rejected")
EDITABLE = ("draft", "submitted", "rejected")


@dataclass(frozen=True)
class Suggestion:
    """A model-written reply offered to the trainer; nothing is stored until they insert it."""

    text: str
    finished: bool
    model_version_id: int
    sampling: dict[str, Any]


def _require_demonstration(conversation: Conversation) -> None:
    if conversation.kind != "demonstration":
        raise ValueError(f"conversation {conversation.id} is not a demonstration (kind {conversation.kind})")


def _require_editable(user: User, conversation: Conversation) -> None:
    _require_demonstration(conversation)
    require_owner(user, conversation, "edit this demonstration")
    if conversation.status not in EDITABLE:
        raise ValueError(
            f"demonstration {conversation.id} is {conversation.status}: it can no longer be edited"
        )


def _touch(conversation: Conversation) -> None:
    if conversation.status == "rejected":
        conversation.status = "draft"


def create_demonstration(
    session: Session, trainer: User, *, system_prompt: str = "", title: str = ""
) -> Conversation:
    """A new, empty draft demonstration owned by `trainer`."""
    check_role(trainer, TRAINER_ROLES, "write demonstrations")
    conversation = Conversation(
        owner_id=trainer.id, kind="demonstration", status="draft", system_prompt=system_prompt, title=title
    )
    session.add(conversation)
    session.flush()
    return conversation


def demonstration_turns(session: Session, conversation: Conversation) -> list[Message]:
    """The demonstration's turns, first to last."""
    _require_demonstration(conversation)
    return list(
        session.scalars(
            select(Message).where(Message.conversation_id == conversation.id).order_by(Message.id)
        )
    )


def demonstrations_of(session: Session, trainer: User) -> list[Conversation]:
    """The trainer's demonstrations, most recently updated first."""
    query = (
        select(Conversation)
        .where(Conversation.owner_id == trainer.id, Conversation.kind == "demonstration")
        .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
    )
    return list(session.scalars(query))


def submitted_demonstrations(session: Session) -> list[Conversation]:
    """Demonstrations waiting for review, oldest first, with their turns and owners loaded."""
    query = (
        select(Conversation)
        .where(Conversation.kind == "demonstration", Conversation.status == "submitted")
        .order_by(Conversation.updated_at, Conversation.id)
        .options(selectinload(Conversation.messages), selectinload(Conversation.owner))
    )
    return list(session.scalars(query))


def add_turn(
    session: Session,
    conversation: Conversation,
    trainer: User,
    role: str,
    content: str,
    *,
    suggestion: Suggestion | None = None,
) -> Message:
    """Append a turn the trainer wrote; `suggestion` records the model reply it started from, if any."""
    _require_editable(trainer, conversation)
    turns = demonstration_turns(session, conversation)
    expected = "user" if not turns or turns[-1].role == "assistant" else "assistant"
    if role != expected:
        raise ValueError(f"the next turn of demonstration {conversation.id} has role {expected}, not {role}")
    if suggestion is not None and role != "assistant":
        raise ValueError("only an assistant turn can start from a model suggestion")
    extra: dict[str, Any] = {}
    if suggestion is not None:
        extra["suggestion"] = dataclasses.asdict(suggestion)
    message = add_message(
        session,
        conversation,
        turns[-1] if turns else None,
        role,
        content,
        author_user_id=trainer.id,
        extra=extra,
    )
    _touch(conversation)
    return message


def edit_turn(session: Session, message: Message, trainer: User, content: str) -> Message:
    """Replace the text of one of the trainer's demonstration turns (drafts are saved as they type)."""
    _require_editable(trainer, message.conversation)
    message.content = content
    _touch(message.conversation)
    session.flush()
    return message


def remove_last_turn(session: Session, conversation: Conversation, trainer: User) -> None:
    """Delete the demonstration's last turn."""
    _require_editable(trainer, conversation)
    turns = demonstration_turns(session, conversation)
    if not turns:
        raise ValueError(f"demonstration {conversation.id} has no turns")
    conversation.messages.remove(turns[-1])  # delete-orphan: the row goes at flush
    _touch(conversation)
    session.flush()


def delete_demonstration(session: Session, conversation: Conversation, trainer: User) -> None:
    """Delete one of the trainer's demonstrations that has not been accepted."""
    _require_editable(trainer, conversation)
    session.delete(conversation)
    session.flush()


def suggest_replies_many(
    session: Session,
    handle: PolicyHandle,
    contexts: Sequence[Conversation | Message],
    n: int = 4,
    params: SamplingParams | None = None,
) -> list[list[Suggestion]]:
    """`n` suggestions for the next assistant turn of each context, sampled in one batch.

    A context is a demonstration (its last turn must be a user turn) or a user message. With a
    seed in `params`, suggestion i uses seed + i, so the same request gives the same suggestions.
    """
    if n < 1:
        raise ValueError(f"ask for at least one suggestion, not {n}")
    params = params or SamplingParams()
    last_user: list[Message] = []
    for context in contexts:
        if isinstance(context, Conversation):
            turns = demonstration_turns(session, context)
            if not turns:
                raise ValueError(f"demonstration {context.id} has no user turn to reply to")
            context = turns[-1]
        if context.role != "user":
            raise ValueError(f"suggestions answer a user turn; message {context.id} has role {context.role}")
        last_user.append(context)
    chats = [context_of(session, m) for m in last_user]
    rows = [
        dataclasses.replace(params, seed=None if params.seed is None else params.seed + i)
        for _ in chats
        for i in range(n)
    ]
    replies = sample_for(handle, [chat for chat in chats for _ in range(n)], rows)
    suggestions = [
        Suggestion(r.text, r.finished, handle.version_id, sampling_record(p))
        for r, p in zip(replies, rows, strict=True)
    ]
    return [suggestions[i * n : (i + 1) * n] for i in range(len(chats))]


def suggest_replies(
    session: Session,
    handle: PolicyHandle,
    context: Conversation | Message,
    n: int = 4,
    params: SamplingParams | None = None,
) -> list[Suggestion]:
    """`n` model-written suggestions for the next assistant turn of one demonstration (or user message)."""
    return suggest_replies_many(session, handle, [context], n, params)[0]


def submit_demonstration(session: Session, conversation: Conversation, trainer: User) -> Conversation:
    """Hand a demonstration in for review: alternating turns, no blank one, the last by the assistant."""
    _require_editable(trainer, conversation)
    turns = demonstration_turns(session, conversation)
    if not turns:
        raise ValueError(f"demonstration {conversation.id} is empty")
    blank = [i + 1 for i, m in enumerate(turns) if not m.content.strip()]
    if blank:
        raise ValueError(f"demonstration {conversation.id}: turn(s) {blank} are empty")
    if turns[-1].role != "assistant":
        raise ValueError(f"demonstration {conversation.id} must end with an assistant turn")
    conversation.status = "submitted"
    session.flush()
    log.info("demonstration %d submitted by %s", conversation.id, trainer.name)
    return conversation


def review_demonstration(
    session: Session, conversation: Conversation, admin: User, *, accept: bool
) -> Conversation:
    """An admin accepts or rejects a submitted demonstration."""
    check_role(admin, ("admin",), "review demonstrations")
    _require_demonstration(conversation)
    if conversation.status != "submitted":
        raise ValueError(f"demonstration {conversation.id} is {conversation.status}, not submitted")
    conversation.status = "accepted" if accept else "rejected"
    session.flush()
    return conversation
