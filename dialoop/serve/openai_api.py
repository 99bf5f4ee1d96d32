"""The OpenAI-compatible API: `/v1/chat/completions` and `/v1/completions` (stream or not), `/v1/models`,
the served-model switch.

Follows OpenAI's contract (with vLLM's extra sampling parameters top_k, min_p, repetition_penalty), errors
included ({"error": {"message", "type", "param", "code"}}), so that the official `openai` client works
unchanged:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="dl-...")
    client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from dialoop.modeling.loading import ModelLoadError
from dialoop.records import ChatMessage
from dialoop.serve.decoding import Event, Generation, TextDelta, TokenLogprob
from dialoop.serve.deps import ApiAdminDep, ApiUserDep, RegistryDep, ServeSettingsDep, WorkerDep
from dialoop.serve.generation import event_stream, openai_error, owner_of, sse, submit
from dialoop.serve.models import ModelEntry, UnknownModel
from dialoop.serve.openai_errors import OpenAIError
from dialoop.serve.openai_schemas import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    SamplingFields,
    ServedRequest,
)
from dialoop.serve.worker import GenerationWorker
from dialoop.settings import ServeSettings

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])

LEGACY_MAX_TOKENS = 16  # Completions' default max_tokens, as in OpenAI's API


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


# fields of OpenAI's requests that do not change the text: accepted, not used
IGNORED_FIELDS = frozenset({"metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
# fields accepted only in the form that asks for nothing beyond plain text
NO_OP_VALUES: dict[str, Callable[[Any], bool]] = {
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "tools": lambda v: not v,
    "tool_choice": lambda v: v is None or v == "none",
    "functions": lambda v: not v,
    "function_call": lambda v: v is None or v == "none",
    "parallel_tool_calls": lambda v: v is None,
    "logit_bias": lambda v: not v,
    "modalities": lambda v: v is None or v == ["text"],
    "best_of": lambda v: v is None or v == 1,
}


def refuse_unsupported(body: SamplingFields) -> None:
    """400 naming the first request field this server does not implement (never silently ignored)."""
    for name, value in (body.model_extra or {}).items():
        if name in IGNORED_FIELDS:
            continue
        allowed = NO_OP_VALUES.get(name)
        if allowed is not None and allowed(value):
            continue
        raise OpenAIError(
            400,
            f"`{name}` is not supported by this server"
            + (f" (only its plain-text form: {name} is ignored when absent)." if allowed else "."),
            param=name,
            code="unsupported_parameter",
        )


def _stops(body: SamplingFields, limits: ServeSettings) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > limits.max_stop:
        raise OpenAIError(400, f"At most {limits.max_stop} stop sequences are allowed.", param="stop")
    return [s for s in stops if s]


def _max_tokens(body: SamplingFields, limits: ServeSettings, default: int | None = None) -> int | None:
    completion = getattr(body, "max_completion_tokens", None)
    param = "max_completion_tokens" if completion is not None else "max_tokens"
    value = completion if completion is not None else body.max_tokens
    if value is not None and value > limits.max_tokens_limit:
        raise OpenAIError(
            400, f"{param} is {value}; this server allows at most {limits.max_tokens_limit}.", param=param
        )
    return default if value is None else value


def _sampling(body: SamplingFields, limits: ServeSettings) -> dict[str, Any]:
    """The engine's sampling parameters of a request (OpenAI's defaults where it gives none)."""
    refuse_unsupported(body)
    n = body.n or 1
    if n > limits.max_n:
        raise OpenAIError(400, f"n is {n}; this server allows at most {limits.max_n}.", param="n")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0:  # only the most likely token is left: that is greedy decoding
        temperature, top_p = 0.0, 1.0
    return {
        "n": n,
        "stop": _stops(body, limits),
        "seed": body.seed,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": max(body.top_k or 0, 0),
        "min_p": body.min_p or 0.0,
        "repetition_penalty": body.repetition_penalty or 1.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "presence_penalty": body.presence_penalty or 0.0,
    }


async def _submit(
    worker: GenerationWorker, body: ChatCompletionRequest, limits: ServeSettings, owner: str
) -> Generation:
    """Validate `body` against the limits and queue its generation; every refusal is an OpenAIError."""
    sampling = _sampling(body, limits)
    top = body.top_logprobs or 0
    if top and not body.logprobs:
        raise OpenAIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
    messages = _chat_messages(body, limits)
    return await submit(
        worker,
        messages,
        api="openai",
        owner=owner,
        model=body.model,
        max_tokens=_max_tokens(body, limits),
        logprobs=bool(body.logprobs),
        top_logprobs=top,
        **sampling,
    )


def _usage(gens: list[Generation]) -> dict[str, int]:
    prompt = sum(g.prompt_tokens * g.n for g in gens) if len(gens) > 1 else gens[0].prompt_tokens
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _failure(reason: str, error: str | None) -> OpenAIError:
    if reason == "cancelled":
        return OpenAIError(
            503, "The generation was cancelled on the server.", type="server_error", code="cancelled"
        )
    return OpenAIError(500, error or "The generation failed.", type="server_error")


async def _results_unless_disconnected(request: Request, gens: list[Generation]) -> list[Any] | None:
    """Every generation's choices, or None when the client went away first (they are cancelled)."""
    waiter = asyncio.ensure_future(asyncio.gather(*(g.result() for g in gens)))
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=0.25)
            if done:
                return waiter.result()
            if await request.is_disconnected():
                for g in gens:
                    g.cancel()
                return None
    finally:
        if not waiter.done():
            waiter.cancel()


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(infos: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Chat Completions' `logprobs` of a choice (or a chunk): one entry per token."""
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": _token_bytes(t.token),
                "top_logprobs": [
                    {"token": tok, "logprob": lp, "bytes": _token_bytes(tok)} for tok, lp in t.top
                ],
            }
            for t in infos
        ],
        "refusal": None,
    }


def legacy_logprobs(infos: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """Completions' `logprobs` of a choice (or a chunk): parallel lists; `offset` is the text before."""
    offsets = []
    for t in infos:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in infos],
        "token_logprobs": [t.logprob for t in infos],
        "top_logprobs": [dict(t.top) for t in infos],
        "text_offset": offsets,
    }


async def _merged(gens: list[Generation]) -> AsyncIterator[tuple[int, Event]]:
    """(generation number, event) of several generations as they come; leaving early cancels them all."""
    if len(gens) == 1:
        async for event in gens[0].events():
            yield 0, event
        return
    merged: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()

    async def pump(k: int, gen: Generation) -> None:
        async for event in gen.events():
            await merged.put((k, event))
        await merged.put(None)

    tasks = [asyncio.ensure_future(pump(k, g)) for k, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            item = await merged.get()
            if item is None:
                left -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for g in gens:
            g.cancel()


async def _stream(
    gens: list[Generation], completion_id: str, include_usage: bool, *, chat: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; ends with `data: [DONE]`; leaving early cancels.

    Choice `k * n + i` is choice i of prompt k (the chat endpoint has one prompt)."""
    first = gens[0]
    offsets: dict[int, int] = {}

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": first.created,
            "model": first.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if include_usage:
            out["usage"] = None
        return out

    def choice(
        index: int, text: str | None, infos: Sequence[TokenLogprob], finish: str | None
    ) -> dict[str, Any]:
        logprobs: dict[str, Any] | None = None
        if infos:
            logprobs = chat_logprobs(infos) if chat else legacy_logprobs(infos, offsets.get(index, 0))
        if not chat:
            offsets[index] = offsets.get(index, 0) + len(text or "")
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    try:
        if chat:
            for i in range(first.n):
                yield sse(chunk([{**choice(i, "", (), None), "delta": {"role": "assistant", "content": ""}}]))
        failed = False
        async for k, event in _merged(gens):
            index = k * first.n + event.index
            if isinstance(event, TextDelta):
                yield sse(chunk([choice(index, event.text, event.logprobs, None)]))
            elif event.finish_reason in ("stop", "length"):
                yield sse(chunk([choice(index, None, (), event.finish_reason)]))
            else:
                yield sse(_failure(event.finish_reason, event.error).body())
                failed = True
                break
        if include_usage and not failed:
            final = chunk([])
            final["usage"] = _usage(gens)
            yield sse(final)
        yield sse("[DONE]")
    finally:
        for g in gens:
            g.cancel()  # a no-op when it finished; otherwise the client went away mid-stream


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    user: ApiUserDep,
    worker: WorkerDep,
    limits: ServeSettingsDep,
) -> Response | dict[str, Any]:
    """Create a chat completion, streamed as server-sent events when `stream` is true."""
    gen = await _submit(worker, body, limits, owner_of(user.id))
    completion_id = f"chatcmpl-{gen.id}"
    log.debug("user %s: generation %s on %s (n=%d)", user.name, gen.id, gen.model, gen.n)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(_stream([gen], completion_id, include_usage, chat=True))
    found = await _results_unless_disconnected(request, [gen])
    if found is None:
        return Response(status_code=499)  # nobody is listening any more
    results = found[0]
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
                "logprobs": chat_logprobs(r.logprobs) if body.logprobs else None,
                "finish_reason": r.finish_reason,
            }
            for r in results
        ],
        "usage": _usage([gen]),
    }


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest,
    request: Request,
    user: ApiUserDep,
    worker: WorkerDep,
    limits: ServeSettingsDep,
) -> Response | dict[str, Any]:
    """Complete prompt strings (OpenAI's legacy Completions, as vLLM serves it), streamed when `stream`."""
    if body.echo:
        raise OpenAIError(
            400, "`echo` is not supported by this server.", param="echo", code="unsupported_parameter"
        )
    if body.suffix:
        raise OpenAIError(
            400, "`suffix` is not supported by this server.", param="suffix", code="unsupported_parameter"
        )
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or any(not p for p in prompts):
        raise OpenAIError(400, "The prompt must be a non-empty string or list of them.", param="prompt")
    sampling = _sampling(body, limits)
    if len(prompts) * sampling["n"] > limits.max_n:
        raise OpenAIError(
            400,
            f"{len(prompts)} prompts x n={sampling['n']} choices; this server allows at most {limits.max_n}.",
            param="prompt",
        )
    for i, p in enumerate(prompts):
        if len(p) > limits.max_message_chars:
            raise OpenAIError(
                413,
                f"prompt[{i}] is {len(p)} characters long; this server accepts at most "
                f"{limits.max_message_chars}.",
                param="prompt",
                code="message_too_long",
            )
    top = body.logprobs
    gens: list[Generation] = []
    try:
        for p in prompts:
            gens.append(
                await submit(
                    worker,
                    None,
                    text=p,
                    api="openai",
                    owner=owner_of(user.id),
                    model=body.model,
                    max_tokens=_max_tokens(body, limits, default=LEGACY_MAX_TOKENS),
                    logprobs=top is not None,
                    top_logprobs=top or 0,
                    **sampling,
                )
            )
    except BaseException:
        for g in gens:
            g.cancel()
        raise
    completion_id = f"cmpl-{gens[0].id}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(_stream(gens, completion_id, include_usage, chat=False))
    found = await _results_unless_disconnected(request, gens)
    if found is None:
        return Response(status_code=499)
    choices = []
    for k, results in enumerate(found):
        for r in results:
            if r.finish_reason not in ("stop", "length"):
                raise _failure(r.finish_reason, None)
            choices.append(
                {
                    "index": k * gens[0].n + r.index,
                    "text": r.text,
                    "logprobs": legacy_logprobs(r.logprobs) if top is not None else None,
                    "finish_reason": r.finish_reason,
                }
            )
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": gens[0].created,
        "model": gens[0].model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": _usage(gens),
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
        "metrics": worker.metrics(),
        "served": registry.served,
        "loaded": registry.loaded(),
    }
