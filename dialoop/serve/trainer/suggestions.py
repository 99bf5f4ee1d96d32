"""Suggestions: `n` replies of the served policy to a demonstration's user turn, streamed as they decode.

They are kept by the server (not stored) until one is inserted as a turn, which records it as the
turn's origin; the oldest sets are dropped first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from dialoop.collect import Suggestion, demonstration_turns
from dialoop.collect.common import context_of, sampling_record
from dialoop.collect.demonstrations import EDITABLE
from dialoop.records import ChatMessage
from dialoop.serve.decoding import ChoiceEnd, TextDelta
from dialoop.serve.deps import EngineDep, RegistryDep, ServeSettingsDep, WorkerDep
from dialoop.serve.generation import event_stream, live, owner_of, sse, stop, submit
from dialoop.serve.limits import check_max_tokens
from dialoop.serve.models import version_id_of
from dialoop.serve.trainer.common import (
    SuggestionSet,
    Trainer,
    own_demonstration,
    router,
    trainer_settings,
    trainer_state,
)
from dialoop.serve.trainer.schemas import SuggestIn
from dialoop.store.db import session_scope
from dialoop.store.models import User

_KEPT_SUGGESTION_SETS = 1000  # suggestion sets kept for insertion (oldest dropped first)


@router.post("/api/trainer/demonstrations/{demonstration_id}/suggestions")
async def suggest(
    request: Request,
    demonstration_id: int,
    body: SuggestIn,
    trainer: Trainer,
    engine: EngineDep,
    worker: WorkerDep,
    registry: RegistryDep,
    limits: ServeSettingsDep,
) -> StreamingResponse:
    """Stream `n` replies of the served policy to the demonstration's last user turn, all decoded at once.

    When the last turn is an assistant turn, they answer the user turn before it (inserting one
    replaces that assistant turn).
    """
    config = trainer_settings(request)
    most = min(config.max_suggestions, worker.max_batch)
    if body.n > most:
        raise HTTPException(422, f"ask for at most {most} suggestions, not {body.n}")
    max_tokens = body.max_tokens or config.suggestion_max_tokens
    check_max_tokens(max_tokens, limits)
    user_id = trainer.id

    def prepare() -> tuple[int, list[ChatMessage]]:
        with session_scope(engine) as session:
            conv = own_demonstration(session, session.get_one(User, user_id), demonstration_id)
            if conv.status not in EDITABLE:
                raise HTTPException(
                    422, f"demonstration {conv.id} is {conv.status}: it can no longer be edited"
                )
            turns = demonstration_turns(session, conv)
            if not turns:
                raise HTTPException(422, "write the user's first turn: suggestions answer a user turn")
            # turns alternate from a user turn: the last one, or the one before the last assistant turn
            context = turns[-1] if turns[-1].role == "user" else turns[-2]
            return context.id, context_of(session, context)

    context_id, prompt = await run_in_threadpool(prepare)
    generation = await submit(
        worker,
        prompt,
        owner=owner_of(user_id),
        n=body.n,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
    )
    state = trainer_state(request)
    generations = live(request)
    generations.add(generation, owner_id=user_id, scope=f"demonstration:{demonstration_id}")

    def keep(texts: list[list[str]], ends: dict[int, ChoiceEnd]) -> list[dict[str, Any]]:
        with session_scope(engine) as session:
            version_id = version_id_of(session, registry.resolve(generation.model))
        suggestions = [
            Suggestion(
                "".join(texts[i]),
                ends[i].finish_reason == "stop",
                version_id,
                sampling_record(generation.params[i]),
            )
            for i in range(generation.n)
        ]
        state.sets[generation.id] = SuggestionSet(user_id, demonstration_id, context_id, suggestions)
        while len(state.sets) > _KEPT_SUGGESTION_SETS:
            state.sets.popitem(last=False)
        return [
            {"index": i, "text": s.text, "finished": s.finished, "finish_reason": ends[i].finish_reason}
            for i, s in enumerate(suggestions)
        ]

    async def events() -> AsyncIterator[str]:
        texts: list[list[str]] = [[] for _ in range(generation.n)]
        ends: dict[int, ChoiceEnd] = {}
        try:
            yield sse(
                {
                    "type": "start",
                    "generation_id": generation.id,
                    "n": generation.n,
                    "model": generation.model,
                }
            )
            async for event in generation.events():
                if isinstance(event, TextDelta):
                    texts[event.index].append(event.text)
                    yield sse({"type": "delta", "index": event.index, "text": event.text})
                else:
                    ends[event.index] = event
                    yield sse({"type": "end", "index": event.index, "finish_reason": event.finish_reason})
            errors = [e.error or "generation failed" for e in ends.values() if e.finish_reason == "error"]
            if errors:
                yield sse({"type": "error", "message": errors[0]})
                return
            suggestions = await run_in_threadpool(keep, texts, ends)
            yield sse({"type": "done", "generation_id": generation.id, "suggestions": suggestions})
        finally:
            generations.remove(generation)
            generation.cancel()  # a no-op once finished; a client that left stops the decoding

    return event_stream(events())


@router.post("/api/trainer/suggestions/{generation_id}/stop", status_code=204)
async def stop_suggestions(request: Request, generation_id: str, trainer: Trainer) -> Response:
    """Cancel suggestions being written; what they have so far can still be inserted."""
    generation = live(request).find(generation_id, owner_id=trainer.id)
    if generation is None:
        raise HTTPException(404, f"no running suggestions {generation_id}")
    await stop(generation)
    return Response(status_code=204)
