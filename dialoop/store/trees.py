"""Message trees: add a message, walk to the root, list children, siblings and root-to-leaf paths.

A conversation is a tree of `Message`s linked by `parent_id`; siblings (same parent) are edits or
regenerations. Functions take a session and at most flush; the caller's `session_scope` commits.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dialoop.records import ChatMessage
from dialoop.store.models import MESSAGE_ROLES, Conversation, Message


def add_message(
    session: Session,
    conversation: Conversation,
    parent: Message | None,
    role: str,
    content: str,
    **author: Any,
) -> Message:
    """A new message (flushed: it has its id) under `parent`, None for a root; `author` sets
    author_user_id, author_model_id, sampling, finished or extra."""
    if role not in MESSAGE_ROLES:
        raise ValueError(f"invalid message role {role!r}: choose one of {', '.join(MESSAGE_ROLES)}")
    if parent is not None and parent.conversation is not conversation:
        raise ValueError("the parent message belongs to another conversation")
    message = Message(conversation=conversation, parent=parent, role=role, content=content, **author)
    session.add(message)
    session.flush()
    return message


def path_to_root(session: Session, message: Message) -> list[Message]:
    """The messages from the root down to `message` (included)."""
    path = [message]
    # `parent` is a many-to-one by primary key: loaded rows come from the identity map, no query
    while path[-1].parent is not None:
        parent = path[-1].parent
        assert parent is not None
        path.append(parent)
    path.reverse()
    return path


def children(session: Session, message: Message) -> list[Message]:
    """The direct replies to `message`, oldest first."""
    return list(session.scalars(select(Message).where(Message.parent_id == message.id).order_by(Message.id)))


def siblings(session: Session, message: Message) -> list[Message]:
    """`message` and the other messages with the same parent (roots: the conversation's roots), oldest
    first; the position of `message` in the list is its `i` in a `< i/n >` switcher."""
    parent_clause = (
        Message.parent_id.is_(None) if message.parent_id is None else Message.parent_id == message.parent_id
    )
    query = select(Message).where(Message.conversation_id == message.conversation_id, parent_clause)
    return list(session.scalars(query.order_by(Message.id)))


def as_chat(messages: list[Message], system_prompt: str = "") -> list[ChatMessage]:
    """`messages` as chat dicts, led by `system_prompt` when set and no system message leads already."""
    chat: list[ChatMessage] = [{"role": m.role, "content": m.content} for m in messages]
    if system_prompt and not (chat and chat[0]["role"] == "system"):
        chat.insert(0, {"role": "system", "content": system_prompt})
    return chat


def leaf_paths(session: Session, conversation: Conversation) -> list[list[Message]]:
    """Every root-to-leaf path of the conversation, in depth-first order with older siblings first.

    Reads `conversation.messages` (one query, or none when the caller eager-loaded it)."""
    by_parent: dict[int | None, list[Message]] = {}
    for message in sorted(conversation.messages, key=lambda m: m.id):
        by_parent.setdefault(message.parent_id, []).append(message)
    paths: list[list[Message]] = []
    # an explicit stack: deep trees must not hit Python's recursion limit
    stack: list[list[Message]] = [[root] for root in reversed(by_parent.get(None, []))]
    while stack:
        path = stack.pop()
        kids = by_parent.get(path[-1].id, [])
        if not kids:
            paths.append(path)
        stack.extend([*path, kid] for kid in reversed(kids))
    return paths
