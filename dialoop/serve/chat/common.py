"""What the chat routes share: the router, the user's own conversations and messages, their JSON."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from sqlalchemy.orm import Session

from dialoop.collect.chats import DELETED
from dialoop.serve.sessions import csrf_protect
from dialoop.store.models import Conversation, Message, User, utc_iso

# every chat route is on this router
router = APIRouter(include_in_schema=False, dependencies=[Depends(csrf_protect)])

CHAT_KIND = "chat"


def chat_scope(conversation_id: int) -> str:
    """What a reply being generated writes into, for `LiveGenerations`."""
    return f"chat:{conversation_id}"


def conversation_json(conv: Conversation) -> dict[str, Any]:
    return {
        "id": conv.id,
        "title": conv.title,
        "system_prompt": conv.system_prompt,
        "created_at": utc_iso(conv.created_at),
        "updated_at": utc_iso(conv.updated_at),
    }


def message_json(message: Message, thumbs: int = 0) -> dict[str, Any]:
    extra = message.extra or {}
    return {
        "id": message.id,
        "parent_id": message.parent_id,
        "role": message.role,
        "content": message.content,
        "created_at": utc_iso(message.created_at),
        "model": extra.get("model"),
        "finished": message.finished,
        "stopped": bool(extra.get("stopped", False)),
        "thumbs": thumbs,
    }


def own_conversation(session: Session, user: User, conversation_id: int) -> Conversation:
    """The user's chat `conversation_id`; 404 when it does not exist or belongs to someone else."""
    conv = session.get(Conversation, conversation_id)
    if conv is None or conv.owner_id != user.id or conv.kind != CHAT_KIND or conv.status == DELETED:
        raise HTTPException(404, f"no conversation {conversation_id}")
    return conv


def message_in(session: Session, conv: Conversation, message_id: int) -> Message:
    """Message `message_id` of `conv`; 404 when it is not in it."""
    message = session.get(Message, message_id)
    if message is None or message.conversation_id != conv.id:
        raise HTTPException(404, f"no message {message_id} in conversation {conv.id}")
    return message
