"""Chats with the current model: trainers' chats are training data (comparison tasks start from them).

Every model reply is stored with the version that wrote it, its sampling parameters and whether it
ended with end-of-turn. Functions only flush; the caller commits.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from dialoop.collect.common import PolicyHandle, context_of, require_owner, sample_for, sampling_record
from dialoop.engine import SamplingParams
from dialoop.store.models import ComparisonTask, Conversation, Feedback, Message, User
from dialoop.store.trees import add_message

TASK_KEY = "comparison_task"  # Message.extra key of alternatives sampled for a comparison task
DELETED = "deleted"  # status of a deleted chat kept for the comparison tasks made from it


def start_chat(session: Session, user: User, *, system_prompt: str = "", title: str = "") -> Conversation:
    """A new, empty chat owned by `user`."""
    conversation = Conversation(
        owner_id=user.id, kind="chat", status="active", system_prompt=system_prompt, title=title
    )
    session.add(conversation)
    session.flush()
    return conversation


def _require_chat(conversation: Conversation) -> None:
    if conversation.kind != "chat":
        raise ValueError(f"conversation {conversation.id} is not a chat (kind {conversation.kind})")


def chat_head(session: Session, conversation: Conversation) -> Message | None:
    """The chat's latest message, not counting alternatives sampled for comparison tasks."""
    _require_chat(conversation)
    messages = session.scalars(
        select(Message).where(Message.conversation_id == conversation.id).order_by(Message.id.desc())
    )
    return next((m for m in messages if TASK_KEY not in (m.extra or {})), None)


def add_user_turn(
    session: Session, conversation: Conversation, user: User, content: str, *, parent: Message | None = None
) -> Message:
    """The user's next turn after `parent` (default: the chat head); an edit goes under an earlier parent."""
    _require_chat(conversation)
    require_owner(user, conversation, "write in this chat")
    if not content.strip():
        raise ValueError("a user turn must not be empty")
    if parent is None:
        parent = chat_head(session, conversation)
    if parent is not None and parent.role != "assistant":
        raise ValueError(f"a user turn follows an assistant turn; message {parent.id} has role {parent.role}")
    return add_message(session, conversation, parent, "user", content, author_user_id=user.id)


def generate_chat_replies(
    session: Session,
    handle: PolicyHandle,
    user_messages: Sequence[Message],
    params: SamplingParams | Sequence[SamplingParams],
) -> list[Message]:
    """The model's reply to each user message (one batch), stored with version, sampling and finished."""
    rows = [params] * len(user_messages) if isinstance(params, SamplingParams) else list(params)
    if len(rows) != len(user_messages):
        raise ValueError(f"got {len(rows)} SamplingParams for {len(user_messages)} user messages")
    for m in user_messages:
        _require_chat(m.conversation)
        if m.role != "user":
            raise ValueError(f"the model replies to user turns; message {m.id} has role {m.role}")
    replies = sample_for(handle, [context_of(session, m) for m in user_messages], rows)
    return [
        add_message(
            session,
            m.conversation,
            m,
            "assistant",
            reply.text,
            author_model_id=handle.version_id,
            sampling=sampling_record(p),
            finished=reply.finished,
        )
        for m, reply, p in zip(user_messages, replies, rows, strict=True)
    ]


def chat_reply(
    session: Session, handle: PolicyHandle, user_message: Message, params: SamplingParams
) -> Message:
    """The model's reply to one user message, stored like `generate_chat_replies` does."""
    return generate_chat_replies(session, handle, [user_message], params)[0]


def chats_of(session: Session, user: User) -> list[Conversation]:
    """The user's chats that are not deleted, most recently updated first."""
    query = (
        select(Conversation)
        .where(Conversation.owner_id == user.id, Conversation.kind == "chat", Conversation.status != DELETED)
        .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
    )
    return list(session.scalars(query))


def thumbs_in(session: Session, conversation: Conversation, user: User) -> dict[int, int]:
    """The user's thumbs (1 or -1) on the conversation's messages, by message id."""
    rows = session.execute(
        select(Feedback.message_id, Feedback.value)
        .join(Message, Message.id == Feedback.message_id)
        .where(
            Message.conversation_id == conversation.id, Feedback.user_id == user.id, Feedback.kind == "thumbs"
        )
    )
    return {message_id: value for message_id, value in rows}


def delete_chat(session: Session, conversation: Conversation) -> None:
    """Delete a chat; one used by comparison tasks is marked deleted instead (rankings keep their context)."""
    used = session.scalar(
        select(func.count())
        .select_from(ComparisonTask)
        .join(Message, Message.id == ComparisonTask.context_message_id)
        .where(Message.conversation_id == conversation.id)
    )
    if used:
        conversation.status = DELETED
    else:
        # one statement: the database's ON DELETE CASCADE removes the messages and their feedback
        session.execute(delete(Conversation).where(Conversation.id == conversation.id))


def set_thumbs(session: Session, message: Message, user: User, value: int) -> None:
    """The user's thumbs up (1), down (-1) or neither (0) on a reply, replacing an earlier one."""
    session.execute(
        delete(Feedback).where(
            Feedback.message_id == message.id, Feedback.user_id == user.id, Feedback.kind == "thumbs"
        )
    )
    if value:
        session.add(Feedback(message_id=message.id, user_id=user.id, kind="thumbs", value=value))
    session.flush()


def set_preference(session: Session, better: Message, worse: Message, user: User) -> None:
    """The user prefers reply `better` to its sibling `worse` (replacing an earlier choice between them)."""
    session.execute(
        delete(Feedback).where(
            Feedback.user_id == user.id,
            Feedback.kind == "ab",
            or_(
                (Feedback.message_id == better.id) & (Feedback.other_message_id == worse.id),
                (Feedback.message_id == worse.id) & (Feedback.other_message_id == better.id),
            ),
        )
    )
    session.add(
        Feedback(message_id=better.id, user_id=user.id, kind="ab", value=1, other_message_id=worse.id)
    )
    session.flush()
