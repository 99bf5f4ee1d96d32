"""The OpenAI-compatible API: `/v1/chat/completions` (stream or not), `/v1/models`, the served-model switch.

Follows OpenAI's Chat Completions contract, errors included ({"error": {"message", "type", "param",
"code"}}), so that the official `openai` client works unchanged:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="dl-...")
    client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from dialoop.modeling.loading import ModelLoadError
from dialoop.records import ChatMessage
from dialoop.serve.deps import (
    ApiAdminDep,
    ApiUserDep,
    OpenAIError,
    RegistryDep,
    ServeSettings,
    ServeSettingsDep,
    WorkerDep,
)
from dialoop.serve.models import ModelEntry, UnknownModel
from dialoop.serve.worker import (
    ChoiceEnd,
    ContextTooLong,
    Generation,
    GenerationWorker,
    QueueFull,
    TextDelta,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])
# included after every other router, so that only URLs nobody serves reach it
fallback_router = APIRouter(prefix="/v1", include_in_schema=False)

_SEED_RANGE = 2**63


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: accepted and ignored

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The parameters of OpenAI's Chat Completions that this server honours; others are ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessageIn] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-_SEED_RANGE, lt=_SEED_RANGE)
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class ServedRequest(BaseModel):
    model: str


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
        raise OpenAIError(422, f"At most {limits.max_stop} stop sequences are allowed.", param="stop")
    return [s for s in stops if s]


def _max_tokens(body: ChatCompletionRequest, limits: ServeSettings) -> int | None:
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    value = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if value is not None and value > limits.max_tokens_limit:
        raise OpenAIError(
            422, f"{param} is {value}; this server allows at most {limits.max_tokens_limit}.", param=param
        )
    return value


async def _submit(worker: GenerationWorker, body: ChatCompletionRequest, limits: ServeSettings) -> Generation:
    """Validate `body` against the limits and queue its generation; every refusal is an OpenAIError."""
    n = body.n or 1
    if n > limits.max_n:
        raise OpenAIError(422, f"n is {n}; this server allows at most {limits.max_n}.", param="n")
    messages = _chat_messages(body, limits)
    max_tokens = _max_tokens(body, limits)
    stop = _stops(body, limits)
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0:  # only the most likely token is left: that is greedy decoding
        temperature, top_p = 0.0, 1.0
    try:
        return await worker.submit(
            messages,
            model=body.model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=body.seed,
            n=n,
            stop=stop,
        )
    except UnknownModel as exc:
        raise OpenAIError(404, str(exc), param="model", code="model_not_found") from exc
    except QueueFull as exc:
        raise OpenAIError(
            429,
            str(exc),
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(exc.retry_after)},
        ) from exc
    except ContextTooLong as exc:
        raise OpenAIError(400, str(exc), param="messages", code="context_length_exceeded") from exc
    except ValueError as exc:
        raise OpenAIError(400, str(exc)) from exc


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


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


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
            yield _sse(chunk([choice(i, {"role": "assistant", "content": ""})]))
        failed = False
        async for event in gen.events():
            if isinstance(event, TextDelta):
                yield _sse(chunk([choice(event.index, {"content": event.text})]))
            elif isinstance(event, ChoiceEnd) and event.finish_reason in ("stop", "length"):
                yield _sse(chunk([choice(event.index, {}, event.finish_reason)]))
            else:
                yield _sse(_failure(event.finish_reason, event.error).body())
                failed = True
                break
        if include_usage and not failed:
            final = chunk([])
            final["usage"] = _usage(gen)
            yield _sse(final)
        yield _sse("[DONE]")
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
        return StreamingResponse(
            _stream(gen, completion_id, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
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
        raise OpenAIError(404, str(exc), param="model", code="model_not_found") from exc
    return _model_object(entry, registry.served)


@router.post("/admin/served")
async def set_served_model(body: ServedRequest, admin: ApiAdminDep, registry: RegistryDep) -> dict[str, Any]:
    """Serve another model version; in-flight requests finish on the model they started with."""
    try:
        entry = await registry.set_served(body.model)
    except UnknownModel as exc:
        raise OpenAIError(404, str(exc), param="model", code="model_not_found") from exc
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


@fallback_router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def unknown_route(path: str, request: Request) -> None:
    """Unknown /v1 URLs (or a known URL with another method) answer in OpenAI's error shape."""
    for route in request.app.router.routes:
        if route is not request.scope.get("route") and route.matches(request.scope)[0] == Match.PARTIAL:
            raise OpenAIError(
                405, f"{request.method} is not allowed on /v1/{path}.", code="method_not_allowed"
            )
    raise OpenAIError(404, f"Unknown request URL: {request.method} /v1/{path}.", code="unknown_url")


def _is_v1(request: Request) -> bool:
    return request.url.path == "/v1" or request.url.path.startswith("/v1/")


async def _openai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    """/v1 validation errors in OpenAI's shape (a body that is not JSON: 400); other paths: FastAPI's."""
    assert isinstance(exc, RequestValidationError)
    if not _is_v1(request):
        return await request_validation_exception_handler(request, exc)
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return JSONResponse(
            OpenAIError(400, "The request body is not valid JSON.", code="invalid_json").body(),
            status_code=400,
        )
    locs = [[p for p in e.get("loc", ()) if p != "body"] for e in errors]
    # a union's errors come one per member type (stop.str, stop.list[str]): name their common prefix
    common: list[Any] = []
    for parts in zip(*[loc for loc in locs if loc[:1] == locs[0][:1]], strict=False):
        if len({str(p) for p in parts}) > 1:
            break
        common.append(parts[0])
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in common).lstrip(".") or None
    message = "; ".join(
        f"{'.'.join(str(p) for p in loc) or 'body'}: {e.get('msg')}"
        for loc, e in zip(locs, errors, strict=True)
    )
    return JSONResponse(
        OpenAIError(422, f"Invalid request: {message}", param=param, code="invalid_value").body(),
        status_code=422,
    )


class _BodyLimit:
    """413 for a /v1 request whose body is larger than the server's limit (checked before it is read)."""

    def __init__(self, app: ASGIApp, get_limit: Any):
        self.app = app
        self.get_limit = get_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and str(scope.get("path", "")).startswith("/v1/"):
            limit = self.get_limit()
            headers = dict(scope.get("headers", []))
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                error = OpenAIError(
                    413,
                    f"The request body is {int(length)} bytes; this server accepts at most {limit}.",
                    code="request_too_large",
                )
                await JSONResponse(error.body(), status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped errors for /v1: OpenAIError anywhere, validation errors, oversized bodies."""
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(_BodyLimit, get_limit=lambda: app.state.serve_settings.max_body_bytes)
