"""What every route that generates shares: submitting to the worker, its refusals as HTTP answers,
server-sent events, and the live generations a user may stop.

    generation = await submit(worker, prompt, owner=owner_of(user.id), max_tokens=64)  # refusals raise
    live(request).add(generation, owner_id=user.id, scope=f"chat:{cid}")  # so that its owner can stop it
    return event_stream(events())                                         # `data: {json}` lines

One table, `REFUSALS`, says how each worker error is answered: the web routes and `/v1` agree on every
status except bad input, which OpenAI's contract answers with 400 where the web API answers 413/422.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import HTTPException, Request
from fastapi.responses import StreamingResponse

from dialoop.records import ChatMessage
from dialoop.serve.decoding import Generation
from dialoop.serve.models import UnknownModel
from dialoop.serve.openai_errors import OpenAIError
from dialoop.serve.worker import ContextTooLong, GenerationWorker, QueueFull

log = logging.getLogger(__name__)

STOP_WAIT_S = 5.0  # how long a stop request waits for the worker to end the generation


@dataclass(frozen=True)
class Refusal:
    """How a worker error is answered: `status` on the web routes, `openai_status` (and code) on /v1."""

    status: int
    openai_status: int
    code: str | None = None
    param: str | None = None
    type: str = "invalid_request_error"


# checked in order: ContextTooLong is a ValueError
REFUSALS: dict[type[Exception], Refusal] = {
    QueueFull: Refusal(429, 429, "queue_full", type="rate_limit_error"),
    UnknownModel: Refusal(404, 404, "model_not_found", param="model"),
    ContextTooLong: Refusal(413, 400, "context_length_exceeded", param="messages"),
    ValueError: Refusal(422, 400),
}
WorkerError = QueueFull | UnknownModel | ValueError


def refusal_of(exc: WorkerError) -> Refusal:
    return next(r for kind, r in REFUSALS.items() if isinstance(exc, kind))


def _headers(exc: WorkerError) -> dict[str, str] | None:
    return {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFull) else None


def http_error(exc: WorkerError) -> HTTPException:
    """The web routes' answer to a worker error."""
    return HTTPException(refusal_of(exc).status, str(exc), headers=_headers(exc))


def openai_error(exc: WorkerError) -> OpenAIError:
    """/v1's answer to a worker error, in OpenAI's shape."""
    r = refusal_of(exc)
    return OpenAIError(
        r.openai_status, str(exc), type=r.type, param=r.param, code=r.code, headers=_headers(exc)
    )


async def submit(
    worker: GenerationWorker,
    messages: list[ChatMessage] | None,
    *,
    text: str | None = None,
    api: Literal["web", "openai"] = "web",
    owner: str = "",
    model: str | None = None,
    max_tokens: int | None = None,
    n: int = 1,
    seed: int | None = None,
    stop: Sequence[str] = (),
    **sampling: Any,
) -> Generation:
    """Queue a generation for `owner` (see `GenerationWorker.submit`; `sampling` holds the other fields of
    `dialoop.engine.SamplingParams`); a refusal is raised as the `api`'s error (HTTPException or
    OpenAIError)."""
    try:
        return await worker.submit(
            messages,
            text=text,
            model=model,
            n=n,
            owner=owner,
            max_tokens=max_tokens,
            seed=seed,
            stop=stop,
            **sampling,
        )
    except (QueueFull, UnknownModel, ValueError) as exc:
        raise (openai_error(exc) if api == "openai" else http_error(exc)) from exc


def owner_of(user_id: int) -> str:
    """The engine's owner of a user's requests: admission is fair across owners."""
    return f"user:{user_id}"


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` (or a bare string such as OpenAI's `[DONE]`)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """A text/event-stream response that proxies do not buffer."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@dataclass(frozen=True)
class LiveGeneration:
    """A generation streaming to its owner, and what it writes into (e.g. `chat:12`), so it can be stopped."""

    owner_id: int
    scope: str
    generation: Generation


class LiveGenerations:
    """The app's generations being streamed, by id (touched only on the event loop)."""

    def __init__(self) -> None:
        self._live: dict[str, LiveGeneration] = {}

    def add(self, generation: Generation, *, owner_id: int, scope: str) -> None:
        self._live[generation.id] = LiveGeneration(owner_id, scope, generation)

    def remove(self, generation: Generation) -> None:
        self._live.pop(generation.id, None)

    def find(self, generation_id: str, *, owner_id: int, scope: str | None = None) -> Generation | None:
        """Live generation `generation_id` if `owner_id` owns it (and it writes into `scope`, if given)."""
        found = self._live.get(generation_id)
        if found is None or found.owner_id != owner_id or (scope is not None and found.scope != scope):
            return None
        return found.generation

    def cancel_scope(self, scope: str) -> None:
        """Cancel every generation writing into `scope` (e.g. a conversation being deleted)."""
        for found in self._live.values():
            if found.scope == scope:
                found.generation.cancel()


def live(request: Request) -> LiveGenerations:
    """The app's live generations."""
    found: LiveGenerations | None = getattr(request.app.state, "live_generations", None)
    if found is None:
        found = request.app.state.live_generations = LiveGenerations()
    return found


async def stop(generation: Generation) -> None:
    """Cancel `generation` and wait (briefly) for the worker to act, so the caller sees it ended."""
    generation.cancel()
    try:
        await asyncio.wait_for(generation.finished.wait(), timeout=STOP_WAIT_S)
    except TimeoutError:
        log.warning("generation %s did not stop within %.0f s", generation.id, STOP_WAIT_S)
