"""Replies in a chat: a new user message (or an edit) and its streamed reply, regenerations, stopping.

A streamed reply is saved when it ends, stopped or cut off: whatever text there is. The reply is
submitted before the user message is saved, so that a refused request (busy, too long) saves nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from dialoop.collect.common import sampling_record
from dialoop.engine import SamplingParams
from dialoop.records import ChatMessage
from dialoop.serve.auth import CurrentUser
from dialoop.serve.chat.common import chat_scope, message_in, message_json, own_conversation, router
from dialoop.serve.chat.schemas import GenerationOptions, MessageIn
from dialoop.serve.decoding import ChoiceEnd, Generation, TextDelta
from dialoop.serve.deps import EngineDep, ServeSettingsDep, WorkerDep
from dialoop.serve.generation import event_stream, live, owner_of, sse, stop, submit
from dialoop.serve.limits import check_max_tokens, check_text
from dialoop.serve.models import ModelEntry, ModelRegistry, UnknownModel, version_id_of
from dialoop.serve.worker import GenerationWorker
from dialoop.settings import ServeSettings
from dialoop.store.db import session_scope
from dialoop.store.models import Conversation, Message, User, utcnow
from dialoop.store.trees import add_message, as_chat, path_to_root

TITLE_CHARS = 80  # an untitled chat is named after the start of its first message


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
    check_text(body.content, "message", limits)
    path: list[Message] = []
    if body.parent_id is not None:
        parent = message_in(session, conv, body.parent_id)
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
    message = message_in(session, conv, message_id)
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
    worker: GenerationWorker,
    limits: ServeSettings,
    user: User,
    prompt: list[ChatMessage],
    options: GenerationOptions,
) -> Generation:
    check_max_tokens(options.max_tokens, limits)
    return await submit(
        worker,
        prompt,
        owner=owner_of(user.id),
        model=options.model,
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
    )


def _stream(
    request: Request, user: User, generation: Generation, prepared: _Prepared, first: list[dict[str, Any]]
) -> StreamingResponse:
    """Stream the generation's text and save the reply when it ends (stopped or cut off: what there is)."""
    engine: Engine = request.app.state.engine
    registry: ModelRegistry = request.app.state.registry
    generations = live(request)
    generations.add(generation, owner_id=user.id, scope=chat_scope(prepared.conversation_id))
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
                yield sse(payload)
            yield sse(
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
                    yield sse({"type": "delta", "text": event.text})
                elif isinstance(event, ChoiceEnd):
                    end = event
            if end is None or end.finish_reason == "error":
                yield sse({"type": "error", "message": (end.error if end else None) or "generation failed"})
                return
            saving = True
            message = None
            if parts or end.finish_reason != "cancelled":  # stopped before its first word: nothing to keep
                message = await run_in_threadpool(save, end.finish_reason, end.completion_tokens)
            yield sse({"type": "done", "finish_reason": end.finish_reason, "message": message})
        finally:
            generations.remove(generation)
            if not saving and (end is None or end.finish_reason != "error"):
                # the client went away mid-reply: cancel the generation and keep its text (a short
                # blocking write: awaiting is not possible in a generator being closed)
                generation.cancel()
                if parts:
                    save("cancelled", None)

    return event_stream(events())


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
    generation = await _submit(worker, limits, user, prepared.prompt, body)
    try:
        saved = await run_in_threadpool(_save_user_message, engine, user.id, conversation_id, body)
    except BaseException:
        generation.cancel()
        raise
    if saved is None:
        generation.cancel()
        raise HTTPException(404, f"no conversation {conversation_id}")
    prepared.parent_id = saved["id"]
    return _stream(request, user, generation, prepared, [{"type": "user", "message": saved}])


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
    generation = await _submit(worker, limits, user, prepared.prompt, body)
    return _stream(request, user, generation, prepared, [])


@router.post("/api/chat/conversations/{conversation_id}/generations/{generation_id}/stop", status_code=204)
async def stop_generation(
    request: Request, conversation_id: int, generation_id: str, user: CurrentUser
) -> Response:
    """Cancel a reply being generated; the text so far is kept as a stopped reply."""
    generation = live(request).find(generation_id, owner_id=user.id, scope=chat_scope(conversation_id))
    if generation is None:
        raise HTTPException(404, f"no running generation {generation_id} in conversation {conversation_id}")
    await stop(generation)
    return Response(status_code=204)
