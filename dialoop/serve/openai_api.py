"""The OpenAI-compatible API: `/v1/chat/completions` (stream or not), `/v1/models`, the served-model switch.

Follows OpenAI's Chat Completions contract, errors included ({"error": {"message", "type", "param",
"code"}}), so that the official `openai` client works unchanged:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="dl-...")
    client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from dialoop.modeling.loading import ModelLoadError
from dialoop.records import ChatMessage
from dialoop.serve.decoding import ChoiceEnd, Generation, TextDelta
from dialoop.serve.deps import ApiAdminDep, ApiUserDep, RegistryDep, ServeSettingsDep, WorkerDep
from dialoop.serve.generation import event_stream, openai_error, sse, submit
from dialoop.serve.models import ModelEntry, UnknownModel
from dialoop.serve.openai_errors import OpenAIError
from dialoop.serve.openai_schemas import ChatCompletionRequest, ChatMessageIn, ServedRequest
from dialoop.serve.worker import GenerationWorker
from dialoop.settings import ServeSettings

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])


def _message_text(message: ChatMessageIn, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise OpenAIError(
                400,
                f"Only text content is supported; messages[{index}] has a `{part.type}` part.",
                param=f"messages[{index}].content",
                code="unsupported_content",
            )
        texts.append(part.text)
    return "".join(texts)


def _chat_messages(body: ChatCompletionRequest, limits: ServeSettings) -> list[ChatMessage]:
    """The request's messages as plain chat messages, within the server's size limits (413 beyond)."""
    if len(body.messages) > limits.max_messages:
        raise OpenAIError(
            413,
            f"Too many messages: {len(body.messages)} (this server accepts at most {limits.max_messages}).",
            param="messages",
            code="too_many_messages",
        )
    out: list[ChatMessage] = []
    for i, m in enumerate(body.messages):
        text = _message_text(m, i)
        if len(text) > limits.max_message_chars:
            raise OpenAIError(
                413,
                f"messages[{i}] is {len(text)} characters long; this server accepts at most "
                f"{limits.max_message_chars} per message.",
                param=f"messages[{i}].content",
                code="message_too_long",
            )
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return out


def _stops(body: ChatCompletionRequest, limits: ServeSettings) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > limits.max_stop:
        raise OpenAIError(400, f"At most {limits.max_stop} stop sequences are allowed.", param="stop")
    return [s for s in stops if s]


def _max_tokens(body: ChatCompletionRequest, limits: ServeSettings) -> int | None:
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    value = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if value is not None and value > limits.max_tokens_limit:
        raise OpenAIError(
            400, f"{param} is {value}; this server allows at most {limits.max_tokens_limit}.", param=param
        )
    return value


async def _submit(worker: GenerationWorker, body: ChatCompletionRequest, limits: ServeSettings) -> Generation:
    """Validate `body` against the limits and queue its generation; every refusal is an OpenAIError."""
    n = body.n or 1
    if n > limits.max_n:
        raise OpenAIError(400, f"n is {n}; this server allows at most {limits.max_n}.", param="n")
    messages = _chat_messages(body, limits)
    max_tokens = _max_tokens(body, limits)
    stop = _stops(body, limits)
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0:  # only the most likely token is left: that is greedy decoding
        temperature, top_p = 0.0, 1.0
    return await submit(
        worker,
        messages,
        api="openai",
        model=body.model,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=body.seed,
        n=n,
        stop=stop,
    )


def _usage(gen: Generation) -> dict[str, int]:
    completion = gen.completion_tokens
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": gen.prompt_tokens + completion,
    }


def _failure(reason: str, error: str | None) -> OpenAIError:
    if reason == "cancelled":
        return OpenAIError(
            503, "The generation was cancelled on the server.", type="server_error", code="cancelled"
        )
    return OpenAIError(500, error or "The generation failed.", type="server_error")


async def _result_unless_disconnected(request: Request, gen: Generation) -> list[Any] | None:
    """The generation's choices, or None when the client went away first (the generation is cancelled)."""
    waiter = asyncio.ensure_future(gen.result())
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=0.25)
            if done:
                return waiter.result()
            if await request.is_disconnected():
                gen.cancel()
                return None
    finally:
        if not waiter.done():
            waiter.cancel()


async def _stream(gen: Generation, completion_id: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; ends with `data: [DONE]`; leaving early cancels."""

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": gen.created,
            "model": gen.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if include_usage:
            out["usage"] = None
        return out

    def choice(index: int, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    try:
        for i in range(gen.n):
            yield sse(chunk([choice(i, {"role": "assistant", "content": ""})]))
        failed = False
        async for event in gen.events():
            if isinstance(event, TextDelta):
                yield sse(chunk([choice(event.index, {"content": event.text})]))
            elif isinstance(event, ChoiceEnd) and event.finish_reason in ("stop", "length"):
                yield sse(chunk([choice(event.index, {}, event.finish_reason)]))
            else:
                yield sse(_failure(event.finish_reason, event.error).body())
                failed = True
                break
        if include_usage and not failed:
            final = chunk([])
            final["usage"] = _usage(gen)
            yield sse(final)
        yield sse("[DONE]")
    finally:
        gen.cancel()  # a no-op when it finished; otherwise the client went away mid-stream


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    user: ApiUserDep,
    worker: WorkerDep,
    limits: ServeSettingsDep,
) -> Response | dict[str, Any]:
    """Create a chat completion, streamed as server-sent events when `stream` is true."""
    gen = await _submit(worker, body, limits)
    completion_id = f"chatcmpl-{gen.id}"
    log.debug("user %s: generation %s on %s (n=%d)", user.name, gen.id, gen.model, gen.n)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(_stream(gen, completion_id, include_usage))
    results = await _result_unless_disconnected(request, gen)
    if results is None:
        return Response(status_code=499)  # nobody is listening any more
    for r in results:
        if r.finish_reason not in ("stop", "length"):
            raise _failure(r.finish_reason, None)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": gen.created,
        "model": gen.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": r.index,
                "message": {"role": "assistant", "content": r.text, "refusal": None},
                "logprobs": None,
                "finish_reason": r.finish_reason,
            }
            for r in results
        ],
        "usage": _usage(gen),
    }


def _model_object(entry: ModelEntry, served: str) -> dict[str, Any]:
    created = entry.created or datetime.fromtimestamp(0)
    return {
        "id": entry.name,
        "object": "model",
        "created": int(created.timestamp()),
        "owned_by": "dialoop",
        "served": entry.name == served,
    }


@router.get("/models")
async def list_models(user: ApiUserDep, registry: RegistryDep) -> dict[str, Any]:
    """The servable model versions: the base model and the store's policy versions."""
    entries = await asyncio.to_thread(registry.entries)
    return {"object": "list", "data": [_model_object(e, registry.served) for e in entries]}


@router.get("/models/{name:path}")
async def retrieve_model(name: str, user: ApiUserDep, registry: RegistryDep) -> dict[str, Any]:
    try:
        entry = await asyncio.to_thread(registry.resolve, name)
    except UnknownModel as exc:
        raise openai_error(exc) from exc
    return _model_object(entry, registry.served)


@router.post("/admin/served")
async def set_served_model(body: ServedRequest, admin: ApiAdminDep, registry: RegistryDep) -> dict[str, Any]:
    """Serve another model version; in-flight requests finish on the model they started with."""
    try:
        entry = await registry.set_served(body.model)
    except UnknownModel as exc:
        raise openai_error(exc) from exc
    except (OSError, ValueError, ModelLoadError) as exc:
        raise OpenAIError(400, f"Cannot load model `{body.model}`: {exc}", param="model") from exc
    log.info("admin %s switched the served model to %s", admin.name, entry.name)
    return {"served": entry.name, "path": entry.path}


@router.get("/admin/stats")
async def worker_stats(admin: ApiAdminDep, worker: WorkerDep, registry: RegistryDep) -> dict[str, Any]:
    """The worker's counters, the queue, the served and loaded models."""
    return {
        **worker.stats.as_dict(),
        "queued_rows": worker.queued_rows,
        "served": registry.served,
        "loaded": registry.loaded(),
    }
