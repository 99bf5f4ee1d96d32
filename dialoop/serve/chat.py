"""The chat: private conversations with the served models, as pages and as a JSON + streaming API.

Pages: `GET /chat` (a new chat) and `GET /chat/{id}`. The page's script talks to `/api/chat`; every
state-changing call carries the CSRF header, and a conversation is visible only to its owner (anyone
else gets 404, whatever their role).

    GET    /api/chat/models                                   models to pick from, and the served one
    GET    /api/chat/conversations                            the user's chats, newest first
    POST   /api/chat/conversations                            {title?, system_prompt?}
    GET    /api/chat/conversations/{cid}                      the whole message tree
    PATCH  /api/chat/conversations/{cid}                      {title?, system_prompt?}
    DELETE /api/chat/conversations/{cid}
    POST   /api/chat/conversations/{cid}/messages             {parent_id, content, model?, ...}: event stream
    POST   /api/chat/conversations/{cid}/messages/{mid}/replies   another reply to user message mid: stream
    POST   /api/chat/conversations/{cid}/generations/{gid}/stop   cancel that generation on the server
    PUT    /api/chat/conversations/{cid}/messages/{mid}/feedback  {value: 1 | -1 | 0} thumbs up/down/none
    POST   /api/chat/conversations/{cid}/messages/{mid}/preference {other_id}: mid is better than other_id

An edit is a new user message next to the edited one (same parent); a regeneration is a new reply next
to the old one. Event streams are `data: {json}` lines: `user` (the new user message), `start`
(generation id), `delta` (text), then `done` (the saved reply) or `error`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import Engine, delete, func, or_, select
from sqlalchemy.orm import Session

from dialoop.collect.common import sampling_record
from dialoop.modeling.generation import SamplingParams
from dialoop.records import ChatMessage
from dialoop.serve.auth import CurrentUser, csrf_protect
from dialoop.serve.deps import EngineDep, RegistryDep, ServeSettings, ServeSettingsDep, SessionDep, WorkerDep
from dialoop.serve.models import ModelEntry, ModelRegistry, UnknownModel, version_id_of
from dialoop.serve.pages import render
from dialoop.serve.worker import ChoiceEnd, ContextTooLong, Generation, GenerationWorker, QueueFull, TextDelta
from dialoop.store.db import session_scope
from dialoop.store.models import ComparisonTask, Conversation, Feedback, Message, User, utcnow
from dialoop.store.trees import add_message, as_chat, path_to_root

log = logging.getLogger(__name__)

CHAT_KIND = "chat"
DELETED = "deleted"  # status of a deleted chat kept for the comparison tasks made from it
TITLE_CHARS = 80  # an untitled chat is named after the start of its first message

router = APIRouter(include_in_schema=False, dependencies=[Depends(csrf_protect)])


class ConversationIn(BaseModel):
    title: str | None = Field(None, max_length=300)
    system_prompt: str | None = None


class GenerationOptions(BaseModel):
    """How to sample the reply; the model is a version name (None: the served one)."""

    model: str | None = Field(None, max_length=200)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)


class MessageIn(GenerationOptions):
    parent_id: int | None = None  # the assistant message replied to (None: the first turn)
    content: str


class FeedbackIn(BaseModel):
    value: int = Field(ge=-1, le=1)  # 1 thumbs up, -1 thumbs down, 0 none


class PreferenceIn(BaseModel):
    other_id: int


@dataclass
class _Live:
    """A generation streaming into a conversation, so that its owner can stop it."""

    user_id: int
    conversation_id: int
    generation: Generation


def _live(request: Request) -> dict[str, _Live]:
    live: dict[str, _Live] | None = getattr(request.app.state, "chat_live", None)
    if live is None:
        live = request.app.state.chat_live = {}
    return live


def _iso(value: Any) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


def conversation_json(conv: Conversation) -> dict[str, Any]:
    return {
        "id": conv.id,
        "title": conv.title,
        "system_prompt": conv.system_prompt,
        "created_at": _iso(conv.created_at),
        "updated_at": _iso(conv.updated_at),
    }


def message_json(message: Message, thumbs: int = 0) -> dict[str, Any]:
    extra = message.extra or {}
    return {
        "id": message.id,
        "parent_id": message.parent_id,
        "role": message.role,
        "content": message.content,
        "created_at": _iso(message.created_at),
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


def _message_in(session: Session, conv: Conversation, message_id: int) -> Message:
    message = session.get(Message, message_id)
    if message is None or message.conversation_id != conv.id:
        raise HTTPException(404, f"no message {message_id} in conversation {conv.id}")
    return message


def _check_text(text: str, what: str, limits: ServeSettings) -> None:
    if len(text) > limits.max_message_chars:
        raise HTTPException(
            413, f"the {what} has {len(text)} characters; the limit is {limits.max_message_chars}"
        )


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
            {"name": e.name, "version_id": e.version_id, "created_at": _iso(e.created)} for e in entries
        ],
    }


@router.get("/api/chat/conversations")
def list_conversations(user: CurrentUser, session: SessionDep) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(Conversation)
        .where(
            Conversation.owner_id == user.id, Conversation.kind == CHAT_KIND, Conversation.status != DELETED
        )
        .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
    )
    return [conversation_json(c) for c in rows]


@router.post("/api/chat/conversations", status_code=201)
def create_conversation(
    body: ConversationIn, user: CurrentUser, session: SessionDep, limits: ServeSettingsDep
) -> dict[str, Any]:
    _check_text(body.system_prompt or "", "system prompt", limits)
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
    rows = session.execute(
        select(Feedback.message_id, Feedback.value)
        .join(Message, Message.id == Feedback.message_id)
        .where(Message.conversation_id == conv.id, Feedback.user_id == user.id, Feedback.kind == "thumbs")
    )
    thumbs = {message_id: value for message_id, value in rows}
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
        _check_text(body.system_prompt, "system prompt", limits)
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
    for live in _live(request).values():
        if live.conversation_id == conv.id:
            live.generation.cancel()
    used = session.scalar(
        select(func.count())
        .select_from(ComparisonTask)
        .join(Message, Message.id == ComparisonTask.context_message_id)
        .where(Message.conversation_id == conv.id)
    )
    if used:
        conv.status = DELETED
    else:
        # one statement: the database's ON DELETE CASCADE removes the messages and their feedback
        session.execute(delete(Conversation).where(Conversation.id == conv.id))
    return Response(status_code=204)


# generation


@dataclass
class _Prepared:
    """What a streamed reply needs once the request is checked: the prompt and where the reply goes."""

    conversation_id: int
    parent_id: int | None  # the user message the reply answers (None until a new one is saved)
    prompt: list[ChatMessage]


def _prepare_post(
    session: Session, user: User, conversation_id: int, body: MessageIn, limits: ServeSettings
) -> _Prepared:
    conv = own_conversation(session, user, conversation_id)
    if not body.content.strip():
        raise HTTPException(422, "the message is empty")
    _check_text(body.content, "message", limits)
    path: list[Message] = []
    if body.parent_id is not None:
        parent = _message_in(session, conv, body.parent_id)
        if parent.role != "assistant":
            raise HTTPException(
                422, "a user message follows an assistant message (or starts the conversation)"
            )
        path = path_to_root(session, parent)
    if len(path) + 1 > limits.max_messages:
        raise HTTPException(
            413, f"the conversation would have {len(path) + 1} messages; the limit is {limits.max_messages}"
        )
    prompt = [*as_chat(path, conv.system_prompt), {"role": "user", "content": body.content}]
    return _Prepared(conv.id, None, prompt)


def _prepare_reply(session: Session, user: User, conversation_id: int, message_id: int) -> _Prepared:
    conv = own_conversation(session, user, conversation_id)
    message = _message_in(session, conv, message_id)
    if message.role != "user":
        raise HTTPException(422, "replies answer a user message")
    return _Prepared(conv.id, message.id, as_chat(path_to_root(session, message), conv.system_prompt))


def _save_user_message(
    engine: Engine, user_id: int, conversation_id: int, body: MessageIn
) -> dict[str, Any] | None:
    with session_scope(engine) as session:
        conv = session.get(Conversation, conversation_id)
        if conv is None:
            return None
        parent = session.get(Message, body.parent_id) if body.parent_id is not None else None
        message = add_message(session, conv, parent, "user", body.content, author_user_id=user_id)
        if not conv.title:
            conv.title = body.content.strip().splitlines()[0][:TITLE_CHARS]
        conv.updated_at = utcnow()
        session.flush()
        return message_json(message)


def _save_reply(
    engine: Engine,
    registry: ModelRegistry,
    prepared: _Prepared,
    model_name: str,
    params: SamplingParams,
    text: str,
    finish_reason: str,
    completion_tokens: int | None,
) -> dict[str, Any] | None:
    """Store a finished or stopped reply; None when the conversation was deleted meanwhile."""
    try:
        entry: ModelEntry | None = registry.resolve(model_name)
    except UnknownModel:
        entry = None
    with session_scope(engine) as session:
        conv = session.get(Conversation, prepared.conversation_id)
        parent = session.get(Message, prepared.parent_id) if prepared.parent_id is not None else None
        if conv is None or parent is None:
            return None
        message = add_message(
            session,
            conv,
            parent,
            "assistant",
            text,
            # a plainly served model becomes a version on its first reply (`version_id_of`): a reply without
            # an author version never becomes a comparison task
            author_model_id=version_id_of(session, entry) if entry else None,
            # the parameters the worker really used, so sampled alternatives can match them
            sampling=sampling_record(params),
            finished=finish_reason == "stop",
            extra={
                "model": model_name,
                "finish_reason": finish_reason,
                "completion_tokens": completion_tokens,
                "stopped": finish_reason == "cancelled",
            },
        )
        conv.updated_at = utcnow()
        session.flush()
        return message_json(message)


async def _submit(
    worker: GenerationWorker, limits: ServeSettings, prompt: list[ChatMessage], options: GenerationOptions
) -> Generation:
    if options.max_tokens is not None and options.max_tokens > limits.max_tokens_limit:
        raise HTTPException(
            422, f"max_tokens is {options.max_tokens}; the limit is {limits.max_tokens_limit}"
        )
    try:
        return await worker.submit(
            prompt,
            model=options.model,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
        )
    except QueueFull as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from exc
    except UnknownModel as exc:
        raise HTTPException(422, str(exc)) from exc
    except ContextTooLong as exc:
        raise HTTPException(413, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _stream(
    request: Request,
    user: User,
    generation: Generation,
    prepared: _Prepared,
    options: GenerationOptions,
    first: list[dict[str, Any]],
) -> StreamingResponse:
    """Stream the generation's text and save the reply when it ends (stopped or cut off: what there is)."""
    engine: Engine = request.app.state.engine
    registry: ModelRegistry = request.app.state.registry
    live = _live(request)
    live[generation.id] = _Live(user.id, prepared.conversation_id, generation)
    parts: list[str] = []
    saving = False

    def save(finish_reason: str, completion_tokens: int | None) -> dict[str, Any] | None:
        text = "".join(parts)
        return _save_reply(
            engine,
            registry,
            prepared,
            generation.model,
            generation.params[0],
            text,
            finish_reason,
            completion_tokens,
        )

    async def events() -> AsyncIterator[str]:
        nonlocal saving
        end: ChoiceEnd | None = None
        try:
            for payload in first:
                yield _event(payload)
            yield _event(
                {
                    "type": "start",
                    "generation_id": generation.id,
                    "model": generation.model,
                    "parent_id": prepared.parent_id,
                }
            )
            async for event in generation.events():
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                    yield _event({"type": "delta", "text": event.text})
                elif isinstance(event, ChoiceEnd):
                    end = event
            if end is None or end.finish_reason == "error":
                yield _event(
                    {"type": "error", "message": (end.error if end else None) or "generation failed"}
                )
                return
            saving = True
            message = None
            if parts or end.finish_reason != "cancelled":  # stopped before its first word: nothing to keep
                message = await run_in_threadpool(save, end.finish_reason, end.completion_tokens)
            yield _event({"type": "done", "finish_reason": end.finish_reason, "message": message})
        finally:
            live.pop(generation.id, None)
            if not saving and (end is None or end.finish_reason != "error"):
                # the client went away mid-reply: cancel the generation and keep its text (a short
                # blocking write: awaiting is not possible in a generator being closed)
                generation.cancel()
                if parts:
                    save("cancelled", None)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/api/chat/conversations/{conversation_id}/messages")
async def post_message(
    request: Request,
    conversation_id: int,
    body: MessageIn,
    user: CurrentUser,
    engine: EngineDep,
    worker: WorkerDep,
    limits: ServeSettingsDep,
) -> StreamingResponse:
    """Add a user message under `parent_id` (an edit when that parent has replies) and stream the reply."""

    def prepare() -> _Prepared:
        with session_scope(engine) as session:
            return _prepare_post(session, user, conversation_id, body, limits)

    prepared = await run_in_threadpool(prepare)
    # the reply starts before the message is saved, so a refused request (busy, too long) saves nothing
    generation = await _submit(worker, limits, prepared.prompt, body)
    try:
        saved = await run_in_threadpool(_save_user_message, engine, user.id, conversation_id, body)
    except BaseException:
        generation.cancel()
        raise
    if saved is None:
        generation.cancel()
        raise HTTPException(404, f"no conversation {conversation_id}")
    prepared.parent_id = saved["id"]
    return _stream(request, user, generation, prepared, body, [{"type": "user", "message": saved}])


@router.post("/api/chat/conversations/{conversation_id}/messages/{message_id}/replies")
async def regenerate(
    request: Request,
    conversation_id: int,
    message_id: int,
    body: GenerationOptions,
    user: CurrentUser,
    engine: EngineDep,
    worker: WorkerDep,
    limits: ServeSettingsDep,
) -> StreamingResponse:
    """Sample another reply to user message `message_id` (a new sibling of its earlier replies)."""

    def prepare() -> _Prepared:
        with session_scope(engine) as session:
            return _prepare_reply(session, user, conversation_id, message_id)

    prepared = await run_in_threadpool(prepare)
    generation = await _submit(worker, limits, prepared.prompt, body)
    return _stream(request, user, generation, prepared, body, [])


@router.post("/api/chat/conversations/{conversation_id}/generations/{generation_id}/stop", status_code=204)
async def stop_generation(
    request: Request, conversation_id: int, generation_id: str, user: CurrentUser
) -> Response:
    """Cancel a reply being generated; the text so far is kept as a stopped reply."""
    live = _live(request).get(generation_id)
    if live is None or live.user_id != user.id or live.conversation_id != conversation_id:
        raise HTTPException(404, f"no running generation {generation_id} in conversation {conversation_id}")
    live.generation.cancel()
    # wait (briefly) for the worker to act, so that the caller sees the generation ended
    try:
        await asyncio.wait_for(live.generation.finished.wait(), timeout=5)
    except TimeoutError:
        log.warning("generation %s did not stop within 5 s", generation_id)
    return Response(status_code=204)


# feedback


def _own_assistant_message(session: Session, user: User, conversation_id: int, message_id: int) -> Message:
    message = _message_in(session, own_conversation(session, user, conversation_id), message_id)
    if message.role != "assistant":
        raise HTTPException(422, "feedback is given on assistant messages")
    return message


@router.put("/api/chat/conversations/{conversation_id}/messages/{message_id}/feedback")
def set_thumbs(
    conversation_id: int, message_id: int, body: FeedbackIn, user: CurrentUser, session: SessionDep
) -> dict[str, Any]:
    """Thumbs up (1), down (-1) or neither (0) on a reply; one per user and reply."""
    message = _own_assistant_message(session, user, conversation_id, message_id)
    session.execute(
        delete(Feedback).where(
            Feedback.message_id == message.id, Feedback.user_id == user.id, Feedback.kind == "thumbs"
        )
    )
    if body.value:
        session.add(Feedback(message_id=message.id, user_id=user.id, kind="thumbs", value=body.value))
    session.flush()
    return {"message_id": message.id, "thumbs": body.value}


@router.post("/api/chat/conversations/{conversation_id}/messages/{message_id}/preference")
def set_preference(
    conversation_id: int, message_id: int, body: PreferenceIn, user: CurrentUser, session: SessionDep
) -> dict[str, Any]:
    """Record that reply `message_id` is better than its sibling `other_id` (replaces an earlier choice)."""
    better = _own_assistant_message(session, user, conversation_id, message_id)
    worse = _own_assistant_message(session, user, conversation_id, body.other_id)
    if better.id == worse.id or better.parent_id != worse.parent_id:
        raise HTTPException(422, "a preference compares two different replies to the same message")
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
    return {"preferred": better.id, "other": worse.id}
