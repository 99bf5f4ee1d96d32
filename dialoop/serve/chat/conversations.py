"""The chat pages, the user's conversations, and their feedback on replies (thumbs, A/B preferences)."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from dialoop.collect.chats import chats_of, delete_chat, set_preference, set_thumbs, thumbs_in
from dialoop.serve.auth import CurrentUser
from dialoop.serve.chat.common import (
    CHAT_KIND,
    chat_scope,
    conversation_json,
    message_in,
    message_json,
    own_conversation,
    router,
)
from dialoop.serve.chat.schemas import ConversationIn, FeedbackIn, PreferenceIn
from dialoop.serve.deps import RegistryDep, ServeSettingsDep, SessionDep
from dialoop.serve.generation import live
from dialoop.serve.limits import check_text
from dialoop.serve.pages import render
from dialoop.store.models import Conversation, Message, User, utc_iso, utcnow

# pages


@router.get("/chat")
def chat_page(request: Request, user: CurrentUser) -> Response:
    """The chat page with no conversation open: the first message starts one."""
    return render(request, "chat.html", {"conversation_id": None})


@router.get("/chat/{conversation_id}")
def conversation_page(
    request: Request, conversation_id: int, user: CurrentUser, session: SessionDep
) -> Response:
    own_conversation(session, user, conversation_id)
    return render(request, "chat.html", {"conversation_id": conversation_id})


# conversations


@router.get("/api/chat/models")
def models(registry: RegistryDep, user: CurrentUser) -> dict[str, Any]:
    """The models a chat can use (the base model, then registered policy versions) and the served one."""
    entries = registry.entries()
    return {
        "served": registry.served,
        "models": [
            {"name": e.name, "version_id": e.version_id, "created_at": utc_iso(e.created)} for e in entries
        ],
    }


@router.get("/api/chat/conversations")
def list_conversations(user: CurrentUser, session: SessionDep) -> list[dict[str, Any]]:
    return [conversation_json(c) for c in chats_of(session, user)]


@router.post("/api/chat/conversations", status_code=201)
def create_conversation(
    body: ConversationIn, user: CurrentUser, session: SessionDep, limits: ServeSettingsDep
) -> dict[str, Any]:
    check_text(body.system_prompt or "", "system prompt", limits)
    conv = Conversation(
        owner_id=user.id,
        kind=CHAT_KIND,
        title=(body.title or "").strip(),
        system_prompt=body.system_prompt or "",
    )
    session.add(conv)
    session.flush()
    return conversation_json(conv)


@router.get("/api/chat/conversations/{conversation_id}")
def get_conversation(conversation_id: int, user: CurrentUser, session: SessionDep) -> dict[str, Any]:
    """The conversation and every message of its tree (the page picks the branch to show)."""
    conv = own_conversation(session, user, conversation_id)
    thumbs = thumbs_in(session, conv, user)
    return {
        "conversation": conversation_json(conv),
        "messages": [message_json(m, thumbs.get(m.id, 0)) for m in conv.messages],
    }


@router.patch("/api/chat/conversations/{conversation_id}")
def update_conversation(
    conversation_id: int,
    body: ConversationIn,
    user: CurrentUser,
    session: SessionDep,
    limits: ServeSettingsDep,
) -> dict[str, Any]:
    """Rename a conversation or change its system prompt."""
    conv = own_conversation(session, user, conversation_id)
    if body.title is not None:
        conv.title = body.title.strip()
    if body.system_prompt is not None:
        check_text(body.system_prompt, "system prompt", limits)
        conv.system_prompt = body.system_prompt
    conv.updated_at = utcnow()
    session.flush()
    return conversation_json(conv)


@router.delete("/api/chat/conversations/{conversation_id}", status_code=204)
def delete_conversation(
    conversation_id: int, user: CurrentUser, session: SessionDep, request: Request
) -> Response:
    """Delete a chat; one used by comparison tasks is hidden instead (rankings keep their context)."""
    conv = own_conversation(session, user, conversation_id)
    live(request).cancel_scope(chat_scope(conv.id))
    delete_chat(session, conv)
    return Response(status_code=204)


# feedback


def _own_assistant_message(session: Session, user: User, conversation_id: int, message_id: int) -> Message:
    message = message_in(session, own_conversation(session, user, conversation_id), message_id)
    if message.role != "assistant":
        raise HTTPException(422, "feedback is given on assistant messages")
    return message


@router.put("/api/chat/conversations/{conversation_id}/messages/{message_id}/feedback")
def thumbs(
    conversation_id: int, message_id: int, body: FeedbackIn, user: CurrentUser, session: SessionDep
) -> dict[str, Any]:
    """Thumbs up (1), down (-1) or neither (0) on a reply; one per user and reply."""
    message = _own_assistant_message(session, user, conversation_id, message_id)
    set_thumbs(session, message, user, body.value)
    return {"message_id": message.id, "thumbs": body.value}


@router.post("/api/chat/conversations/{conversation_id}/messages/{message_id}/preference")
def preference(
    conversation_id: int, message_id: int, body: PreferenceIn, user: CurrentUser, session: SessionDep
) -> dict[str, Any]:
    """Record that reply `message_id` is better than its sibling `other_id` (replaces an earlier choice)."""
    better = _own_assistant_message(session, user, conversation_id, message_id)
    worse = _own_assistant_message(session, user, conversation_id, body.other_id)
    if better.id == worse.id or better.parent_id != worse.parent_id:
        raise HTTPException(422, "a preference compares two different replies to the same message")
    set_preference(session, better, worse, user)
    return {"preferred": better.id, "other": worse.id}
