"""The trainer workspace: demonstrations with streamed model suggestions, ranking comparison tasks, the guide.

Every route needs the trainer or admin role and every state-changing call the CSRF token; all the work
goes through `dialoop.collect`, the functions the simulated trainers use. Trainers chat on the chat page:
their chats are training data, and comparison tasks start from the model's replies in them.

Pages: /trainer, /trainer/demonstrations, /trainer/demonstrations/{did}, /trainer/rank,
/trainer/rank/{tid}, /trainer/rankings, /guide. The pages' scripts talk to:

    GET    /api/trainer/demonstrations                     my demonstrations, newest first
    POST   /api/trainer/demonstrations                     {title?, system_prompt?}: a new draft
    GET    /api/trainer/demonstrations/{did}               the demonstration and its turns
    DELETE /api/trainer/demonstrations/{did}               (not once accepted)
    POST   /api/trainer/demonstrations/{did}/turns         {role, content, suggestion?, replace_last?}
    PUT    /api/trainer/demonstrations/{did}/turns/{mid}   {content}: the autosave of a turn
    DELETE /api/trainer/demonstrations/{did}/turns/{mid}   the last turn only
    POST   /api/trainer/demonstrations/{did}/suggestions   {n, temperature, ...}: event stream of n replies
    POST   /api/trainer/suggestions/{gid}/stop             cancel a suggestion stream on the server
    POST   /api/trainer/demonstrations/{did}/submit        hand it in for review
    POST   /api/trainer/tasks/next                         my next comparison task (made on demand)
    GET    /api/trainer/tasks/{tid}                        a task I may answer, or answered (to change it)
    POST   /api/trainer/tasks/{tid}/ranking                {order, ties, all_bad, flags}
    POST   /api/trainer/tasks/{tid}/skip                   {reason, flags}
    GET    /api/trainer/rankings                           my answers, newest first

Suggestion streams are `data: {json}` lines: `start` (generation id, n), `delta` (index, text), `end`
(index, finish reason), then `done` (the n suggestions) or `error`. Suggestions are kept by the server
(not stored) until one is inserted as a turn, which records it as the turn's origin.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import nh3
from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from markdown_it import MarkdownIt
from markupsafe import Markup
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from dialoop.collect import (
    FLAG_KINDS,
    PolicyHandle,
    Suggestion,
    TaskView,
    add_turn,
    create_comparison_tasks,
    create_demonstration,
    delete_demonstration,
    demonstration_turns,
    edit_turn,
    next_task_for,
    remove_last_turn,
    skip_task,
    submit_demonstration,
    submit_ranking,
    task_view,
)
from dialoop.collect.common import context_of, sampling_record
from dialoop.collect.demonstrations import EDITABLE
from dialoop.collect.tasks import CHAT_SOURCE, DEFAULT_K, DEFAULT_OVERLAP, eligible_originals
from dialoop.records import ChatMessage
from dialoop.serve.auth import csrf_protect, require_role
from dialoop.serve.deps import EngineDep, RegistryDep, ServeSettings, ServeSettingsDep, SessionDep, WorkerDep
from dialoop.serve.models import LoadedModel, ModelRegistry, UnknownModel, version_id_of
from dialoop.serve.pages import WEB_DIR, add_nav_link, render
from dialoop.serve.worker import ChoiceEnd, ContextTooLong, Generation, GenerationWorker, QueueFull, TextDelta
from dialoop.store.db import session_scope
from dialoop.store.models import ComparisonTask, Conversation, Message, Ranking, User, utcnow

log = logging.getLogger(__name__)

GUIDE_FILE = WEB_DIR / "labeling_guide.md"
SKIP_REASONS = (
    "I don't know enough about this topic",
    "The conversation is unclear or broken",
    "The replies are too long to judge well",
    "I'd rather not read this content",
)
_KEPT_SUGGESTION_SETS = 1000  # suggestion sets kept for insertion (oldest dropped first)

TRAINER = require_role("trainer", "admin")
Trainer = Annotated[User, Depends(TRAINER)]

# the role check comes first, so that other roles get 403 for the role whatever their CSRF token
router = APIRouter(include_in_schema=False, dependencies=[Depends(TRAINER), Depends(csrf_protect)])
add_nav_link("Trainer", "/trainer", "trainer", "admin")


class TrainerSettings(BaseSettings):
    """Comparison tasks and suggestions; env vars `DIALOOP_TRAINER_*` (e.g. DIALOOP_TRAINER_K=6)."""

    model_config = SettingsConfigDict(env_prefix="DIALOOP_TRAINER_", extra="ignore")

    # replies per task: the model-written original and k-1 alternatives sampled for the same context
    k: int = Field(default=DEFAULT_K, ge=2, le=16)
    overlap: int = Field(default=DEFAULT_OVERLAP, ge=1)  # rankings each task wants, from different trainers
    tasks_per_refill: int = Field(default=4, ge=1)  # tasks made at once when a trainer finds none open
    alt_models: str = ""  # comma-separated version names that write alternatives too (besides the served)
    max_suggestions: int = Field(default=8, ge=1)  # suggestions per request
    suggestion_max_tokens: int = Field(default=256, ge=1)  # when the request gives none


def configure_trainer(app: Any, config: TrainerSettings) -> None:
    """Use `config` for `app` instead of the environment (tests, the admin pages)."""
    app.state.trainer_settings = config


def trainer_settings(request: Request) -> TrainerSettings:
    config: TrainerSettings | None = getattr(request.app.state, "trainer_settings", None)
    if config is None:
        config = request.app.state.trainer_settings = TrainerSettings()
    return config


@dataclass
class _SuggestionSet:
    """The suggestions of one request, kept until one is inserted (or they age out)."""

    user_id: int
    demonstration_id: int
    context_id: int  # the user turn they answer
    suggestions: list[Suggestion]


@dataclass
class _TrainerState:
    """Per-app state: live suggestion streams (for stop), finished suggestion sets, the task-making lock."""

    live: dict[str, tuple[int, Generation]] = field(default_factory=dict)
    sets: OrderedDict[str, _SuggestionSet] = field(default_factory=OrderedDict)
    # thread locks: the state is used from the event loop and from route threads, and outlives a loop
    making: threading.Lock = field(default_factory=threading.Lock)


_STATE_LOCK = threading.Lock()


def _state(request: Request) -> _TrainerState:
    with _STATE_LOCK:
        state: _TrainerState | None = getattr(request.app.state, "trainer", None)
        if state is None:
            state = request.app.state.trainer = _TrainerState()
        return state


@contextmanager
def collect_errors() -> Iterator[None]:
    """The collect workflows' refusals as HTTP answers with their message."""
    try:
        yield
    except PermissionError as exc:
        raise HTTPException(403, str(exc)) from exc
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


def _check_text(text: str, what: str, limits: ServeSettings) -> None:
    if len(text) > limits.max_message_chars:
        raise HTTPException(
            413, f"the {what} has {len(text)} characters; the limit is {limits.max_message_chars}"
        )


# demonstrations


class DemonstrationIn(BaseModel):
    title: str = Field("", max_length=300)
    system_prompt: str = ""


class SuggestionRef(BaseModel):
    generation_id: str = Field(max_length=64)
    index: int = Field(ge=0)


class TurnIn(BaseModel):
    role: Literal["user", "assistant"]
    content: str
    suggestion: SuggestionRef | None = None  # the suggestion this turn starts from
    replace_last: bool = False  # replace the last (assistant) turn, e.g. by a suggestion


class TurnEdit(BaseModel):
    content: str


class SuggestIn(BaseModel):
    n: int = Field(default=4, ge=1)
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None


def own_demonstration(session: Session, trainer: User, demonstration_id: int) -> Conversation:
    """The trainer's demonstration `demonstration_id`; 404 when it does not exist or is someone else's."""
    conv = session.get(Conversation, demonstration_id)
    if conv is None or conv.kind != "demonstration" or conv.owner_id != trainer.id:
        raise HTTPException(404, f"no demonstration {demonstration_id}")
    return conv


def _turn_json(message: Message) -> dict[str, Any]:
    suggestion = (message.extra or {}).get("suggestion")
    return {
        "id": message.id,
        "role": message.role,
        "content": message.content,
        "from_suggestion": suggestion is not None,
        "suggestion_edited": suggestion is not None and suggestion.get("text") != message.content,
    }


def _demonstration_json(session: Session, conv: Conversation, *, turns: bool = False) -> dict[str, Any]:
    messages = demonstration_turns(session, conv)
    first_user = next((m.content for m in messages if m.role == "user" and m.content.strip()), "")
    out: dict[str, Any] = {
        "id": conv.id,
        "title": conv.title or first_user.strip().split("\n")[0][:80],
        "system_prompt": conv.system_prompt,
        "status": conv.status,
        "editable": conv.status in EDITABLE,
        "turn_count": len(messages),
        "created_at": _iso(conv.created_at),
        "updated_at": _iso(conv.updated_at),
    }
    if turns:
        out["turns"] = [_turn_json(m) for m in messages]
    return out


def my_demonstrations(session: Session, trainer: User) -> list[Conversation]:
    return list(
        session.scalars(
            select(Conversation)
            .where(Conversation.owner_id == trainer.id, Conversation.kind == "demonstration")
            .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
        )
    )


@router.get("/api/trainer/demonstrations")
def list_demonstrations(trainer: Trainer, session: SessionDep) -> list[dict[str, Any]]:
    return [_demonstration_json(session, c) for c in my_demonstrations(session, trainer)]


@router.post("/api/trainer/demonstrations", status_code=201)
def new_demonstration(
    body: DemonstrationIn, trainer: Trainer, session: SessionDep, limits: ServeSettingsDep
) -> dict[str, Any]:
    _check_text(body.system_prompt, "system prompt", limits)
    with collect_errors():
        conv = create_demonstration(
            session, trainer, system_prompt=body.system_prompt, title=body.title.strip()
        )
    return _demonstration_json(session, conv, turns=True)


@router.get("/api/trainer/demonstrations/{demonstration_id}")
def get_demonstration(demonstration_id: int, trainer: Trainer, session: SessionDep) -> dict[str, Any]:
    return _demonstration_json(session, own_demonstration(session, trainer, demonstration_id), turns=True)


@router.delete("/api/trainer/demonstrations/{demonstration_id}", status_code=204)
def remove_demonstration(demonstration_id: int, trainer: Trainer, session: SessionDep) -> Response:
    conv = own_demonstration(session, trainer, demonstration_id)
    with collect_errors():
        delete_demonstration(session, conv, trainer)
    return Response(status_code=204)


def _suggestion_for(
    request: Request, ref: SuggestionRef, trainer: User, conv: Conversation
) -> tuple[_SuggestionSet, Suggestion]:
    found = _state(request).sets.get(ref.generation_id)
    if found is None or found.user_id != trainer.id or found.demonstration_id != conv.id:
        raise HTTPException(
            404,
            "these suggestions are no longer available (the server may have restarted): "
            "ask for new ones, or paste the text as your own",
        )
    if ref.index >= len(found.suggestions):
        raise HTTPException(422, f"there are {len(found.suggestions)} suggestions, not {ref.index + 1}")
    return found, found.suggestions[ref.index]


@router.post("/api/trainer/demonstrations/{demonstration_id}/turns", status_code=201)
def append_turn(
    request: Request,
    demonstration_id: int,
    body: TurnIn,
    trainer: Trainer,
    session: SessionDep,
    limits: ServeSettingsDep,
) -> dict[str, Any]:
    """Append a turn (or replace the last assistant turn), from scratch or from a suggestion."""
    conv = own_demonstration(session, trainer, demonstration_id)
    _check_text(body.content, "turn", limits)
    found, suggestion = (
        _suggestion_for(request, body.suggestion, trainer, conv) if body.suggestion else (None, None)
    )
    with collect_errors():
        if body.replace_last:
            turns = demonstration_turns(session, conv)
            if not turns or turns[-1].role != "assistant":
                raise HTTPException(
                    422, "the last turn is not an assistant turn: there is nothing to replace"
                )
            remove_last_turn(session, conv, trainer)
        if found is not None:
            turns = demonstration_turns(session, conv)
            if not turns or turns[-1].id != found.context_id:
                raise HTTPException(
                    409, "the conversation changed since these suggestions were made: ask for new ones"
                )
        message = add_turn(session, conv, trainer, body.role, body.content, suggestion=suggestion)
    conv.updated_at = utcnow()
    return {"turn": _turn_json(message), "demonstration": _demonstration_json(session, conv)}


def _own_turn(session: Session, conv: Conversation, message_id: int) -> Message:
    message = session.get(Message, message_id)
    if message is None or message.conversation_id != conv.id:
        raise HTTPException(404, f"no turn {message_id} in demonstration {conv.id}")
    return message


@router.put("/api/trainer/demonstrations/{demonstration_id}/turns/{message_id}")
def save_turn(
    demonstration_id: int,
    message_id: int,
    body: TurnEdit,
    trainer: Trainer,
    session: SessionDep,
    limits: ServeSettingsDep,
) -> dict[str, Any]:
    """Save the text of a turn as the trainer types (the page calls it a moment after each change)."""
    conv = own_demonstration(session, trainer, demonstration_id)
    message = _own_turn(session, conv, message_id)
    _check_text(body.content, "turn", limits)
    with collect_errors():
        edit_turn(session, message, trainer, body.content)
    conv.updated_at = utcnow()
    return {"turn": _turn_json(message), "status": conv.status}


@router.delete("/api/trainer/demonstrations/{demonstration_id}/turns/{message_id}", status_code=204)
def delete_last_turn(
    demonstration_id: int, message_id: int, trainer: Trainer, session: SessionDep
) -> Response:
    """Delete the last turn; naming it makes sure a stale page never deletes another one."""
    conv = own_demonstration(session, trainer, demonstration_id)
    message = _own_turn(session, conv, message_id)
    turns = demonstration_turns(session, conv)
    if turns[-1].id != message.id:
        raise HTTPException(409, f"turn {message.id} is not the last turn: only the last one can be removed")
    with collect_errors():
        remove_last_turn(session, conv, trainer)
    conv.updated_at = utcnow()
    return Response(status_code=204)


@router.post("/api/trainer/demonstrations/{demonstration_id}/submit")
def submit(demonstration_id: int, trainer: Trainer, session: SessionDep) -> dict[str, Any]:
    conv = own_demonstration(session, trainer, demonstration_id)
    with collect_errors():
        submit_demonstration(session, conv, trainer)
    conv.updated_at = utcnow()
    return _demonstration_json(session, conv)


# suggestions


async def _submit_generation(
    worker: GenerationWorker, prompt: list[ChatMessage], body: SuggestIn, max_tokens: int
) -> Generation:
    try:
        return await worker.submit(
            prompt,
            n=body.n,
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
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
    if max_tokens > limits.max_tokens_limit:
        raise HTTPException(422, f"max_tokens is {max_tokens}; the limit is {limits.max_tokens_limit}")
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
    generation = await _submit_generation(worker, prompt, body, max_tokens)
    state = _state(request)
    state.live[generation.id] = (user_id, generation)

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
        state.sets[generation.id] = _SuggestionSet(user_id, demonstration_id, context_id, suggestions)
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
            yield _event(
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
                    yield _event({"type": "delta", "index": event.index, "text": event.text})
                else:
                    ends[event.index] = event
                    yield _event({"type": "end", "index": event.index, "finish_reason": event.finish_reason})
            errors = [e.error or "generation failed" for e in ends.values() if e.finish_reason == "error"]
            if errors:
                yield _event({"type": "error", "message": errors[0]})
                return
            suggestions = await run_in_threadpool(keep, texts, ends)
            yield _event({"type": "done", "generation_id": generation.id, "suggestions": suggestions})
        finally:
            state.live.pop(generation.id, None)
            generation.cancel()  # a no-op once finished; a client that left stops the decoding

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/api/trainer/suggestions/{generation_id}/stop", status_code=204)
async def stop_suggestions(request: Request, generation_id: str, trainer: Trainer) -> Response:
    """Cancel suggestions being written; what they have so far can still be inserted."""
    live = _state(request).live.get(generation_id)
    if live is None or live[0] != trainer.id:
        raise HTTPException(404, f"no running suggestions {generation_id}")
    live[1].cancel()
    return Response(status_code=204)


# comparison tasks


class RankingIn(BaseModel):
    order: list[int] = Field(max_length=64)  # candidate indices, best first
    ties: list[list[int]] = Field(default_factory=list, max_length=64)
    all_bad: bool = False
    flags: dict[int, list[str]] = Field(default_factory=dict)  # candidate index -> kinds (FLAG_KINDS)


class SkipIn(BaseModel):
    reason: str = Field(max_length=2000)
    flags: dict[int, list[str]] = Field(default_factory=dict)


def _answer_json(ranking: Ranking) -> dict[str, Any]:
    return {
        "task_id": ranking.task_id,
        "order": ranking.order,
        "ties": ranking.ties,
        "all_bad": ranking.all_bad,
        "flags": ranking.flags,
        "skip_reason": ranking.skip_reason,
        "created_at": _iso(ranking.created_at),
    }


def _counted(task: ComparisonTask) -> int:
    return sum(1 for r in task.rankings if r.skip_reason is None)


def task_json(view: TaskView, trainer: User) -> dict[str, Any]:
    """What the page shows of a task: context, candidates in the trainer's order, their earlier answer."""
    task = view.task
    mine = next((r for r in task.rankings if r.trainer_id == trainer.id), None)
    return {
        "id": task.id,
        "k": len(view.candidates),
        "overlap": task.overlap,
        "rankings": _counted(task),
        "status": task.status,
        "context": view.context,
        "candidates": [
            {"index": c.index, "content": c.message.content, "finished": c.message.finished}
            for c in view.candidates
        ],
        "answer": _answer_json(mine) if mine is not None else None,
    }


def _find_next(engine: Engine, user_id: int) -> dict[str, Any] | None:
    with session_scope(engine) as session:
        trainer = session.get_one(User, user_id)
        with collect_errors():
            view = next_task_for(session, trainer, source=CHAT_SOURCE)
        return task_json(view, trainer) if view is not None else None


async def _next_or_new_task(request: Request, engine: Engine, registry: ModelRegistry, user_id: int) -> Any:
    """The trainer's next task, after making new ones from unused model replies of trainer chats."""
    config = trainer_settings(request)
    state = _state(request)
    names = [n.strip() for n in config.alt_models.split(",") if n.strip()]
    held: list[LoadedModel] = []
    try:
        held.append(await registry.acquire(None))
        for name in names:
            try:
                held.append(await registry.acquire(name))
            except UnknownModel:
                log.warning("alternative model %s is unknown: tasks are sampled without it", name)

        def make_then_find() -> dict[str, Any] | None:
            with state.making:  # one batch at a time: trainers arriving together share it
                found = _find_next(engine, user_id)
                if found is not None:
                    return found
                with session_scope(engine) as session:
                    handles = [
                        PolicyHandle(lm.model, lm.tokenizer, version_id_of(session, lm.entry)) for lm in held
                    ]
                    create_comparison_tasks(
                        session,
                        handles[0],
                        config.tasks_per_refill,
                        rng=random.Random(),
                        k=config.k,
                        overlap=config.overlap,
                        alt_models=handles[1:],
                    )
                return _find_next(engine, user_id)

        # decoding beside the generation worker's thread: a forward pass does not change the model
        return await run_in_threadpool(make_then_find)
    finally:
        for lm in held:
            registry.release(lm)


@router.post("/api/trainer/tasks/next")
async def next_task(
    request: Request, trainer: Trainer, engine: EngineDep, registry: RegistryDep
) -> dict[str, Any]:
    """The next task for me; when none is open, new ones are made first."""
    found = await run_in_threadpool(_find_next, engine, trainer.id)
    if found is None:
        found = await _next_or_new_task(request, engine, registry, trainer.id)
    message = (
        None
        if found is not None
        else "No comparison task is waiting for you. Tasks are made from the model's replies in trainers' "
        "chats (never your own): chat with the model, or come back when other trainers have."
    )
    return {"task": found, "message": message}


def _task_for(session: Session, trainer: User, task_id: int) -> ComparisonTask:
    """A task the trainer may see: one they answered, or an open one not made from their own chat."""
    task = session.get(ComparisonTask, task_id)
    if task is None:
        raise HTTPException(404, f"no comparison task {task_id}")
    answered = any(r.trainer_id == trainer.id for r in task.rankings)
    if task.context_message.conversation.owner_id == trainer.id:
        raise HTTPException(403, f"comparison task {task_id} comes from your own chat")
    if task.status == "cancelled":
        raise HTTPException(409, f"comparison task {task_id} was cancelled")
    if not answered and (task.status != "open" or _counted(task) >= task.overlap):
        raise HTTPException(409, f"comparison task {task_id} has all the rankings it wants")
    return task


@router.get("/api/trainer/tasks/{task_id}")
def get_task(task_id: int, trainer: Trainer, session: SessionDep) -> dict[str, Any]:
    return task_json(task_view(session, _task_for(session, trainer, task_id), trainer), trainer)


@router.post("/api/trainer/tasks/{task_id}/ranking")
def rank(task_id: int, body: RankingIn, trainer: Trainer, session: SessionDep) -> dict[str, Any]:
    """My ranking of a task (replacing my earlier answer to it)."""
    task = _task_for(session, trainer, task_id)
    with collect_errors():
        ranking = submit_ranking(session, task, trainer, body.order, body.ties, body.all_bad, body.flags)
    return _answer_json(ranking)


@router.post("/api/trainer/tasks/{task_id}/skip")
def skip(task_id: int, body: SkipIn, trainer: Trainer, session: SessionDep) -> dict[str, Any]:
    """Skip a task with a reason; flags raised on its replies are kept."""
    task = _task_for(session, trainer, task_id)
    with collect_errors():
        ranking = skip_task(session, task, trainer, body.reason, body.flags)
    return _answer_json(ranking)


def my_answers(session: Session, trainer: User, limit: int = 500) -> list[Ranking]:
    return list(
        session.scalars(
            select(Ranking).where(Ranking.trainer_id == trainer.id).order_by(Ranking.id.desc()).limit(limit)
        )
    )


@router.get("/api/trainer/rankings")
def list_answers(trainer: Trainer, session: SessionDep) -> list[dict[str, Any]]:
    return [_answer_json(r) for r in my_answers(session, trainer)]


# pages


def _my_counts(session: Session, trainer: User) -> dict[str, int]:
    counts = {f"demonstrations_{s}": 0 for s in ("draft", "submitted", "accepted", "rejected")}
    rows = session.execute(
        select(Conversation.status, func.count())
        .where(Conversation.owner_id == trainer.id, Conversation.kind == "demonstration")
        .group_by(Conversation.status)
    )
    for status, n in rows:
        counts[f"demonstrations_{status}"] = n
    counts["chats"] = (
        session.scalar(
            select(func.count())
            .select_from(Conversation)
            .where(
                Conversation.owner_id == trainer.id,
                Conversation.kind == "chat",
                Conversation.status != "deleted",
            )
        )
        or 0
    )
    skipped = Ranking.skip_reason.is_not(None)
    answers = session.execute(
        select(skipped, func.count()).where(Ranking.trainer_id == trainer.id).group_by(skipped)
    )
    by_kind = {bool(k): n for k, n in answers}
    counts["ranked"], counts["skipped"] = by_kind.get(False, 0), by_kind.get(True, 0)
    counts["replies_waiting"] = len(eligible_originals(session))
    counts["tasks_open"] = (
        session.scalar(
            select(func.count()).select_from(ComparisonTask).where(ComparisonTask.status == "open")
        )
        or 0
    )
    return counts


@router.get("/trainer")
def home(request: Request, trainer: Trainer, session: SessionDep, registry: RegistryDep) -> Response:
    served = registry.resolve(None)
    return render(
        request,
        "trainer/home.html",
        {"counts": _my_counts(session, trainer), "served": served.name, "config": trainer_settings(request)},
    )


@router.get("/trainer/demonstrations")
def demonstrations_page(request: Request, trainer: Trainer, session: SessionDep) -> Response:
    demos = [_demonstration_json(session, c) for c in my_demonstrations(session, trainer)]
    return render(request, "trainer/demonstrations.html", {"demonstrations": demos})


@router.post("/trainer/demonstrations")
def new_demonstration_form(
    trainer: Trainer,
    session: SessionDep,
    limits: ServeSettingsDep,
    title: Annotated[str, Form(max_length=300)] = "",
    system_prompt: Annotated[str, Form()] = "",
) -> RedirectResponse:
    """The "New demonstration" button: a new draft, then its editor."""
    _check_text(system_prompt, "system prompt", limits)
    with collect_errors():
        conv = create_demonstration(session, trainer, system_prompt=system_prompt, title=title.strip())
    return RedirectResponse(f"/trainer/demonstrations/{conv.id}", status_code=303)


@router.get("/trainer/demonstrations/{demonstration_id}")
def demonstration_page(
    request: Request, demonstration_id: int, trainer: Trainer, session: SessionDep
) -> Response:
    conv = own_demonstration(session, trainer, demonstration_id)
    config = trainer_settings(request)
    return render(
        request,
        "trainer/demonstration.html",
        {"demonstration": _demonstration_json(session, conv), "max_suggestions": config.max_suggestions},
    )


@router.get("/trainer/rank")
def rank_page(request: Request, trainer: Trainer) -> Response:
    return render(
        request, "trainer/rank.html", {"task_id": None, "skip_reasons": SKIP_REASONS, "flags": FLAG_KINDS}
    )


@router.get("/trainer/rank/{task_id}")
def rank_task_page(request: Request, task_id: int, trainer: Trainer, session: SessionDep) -> Response:
    _task_for(session, trainer, task_id)
    return render(
        request, "trainer/rank.html", {"task_id": task_id, "skip_reasons": SKIP_REASONS, "flags": FLAG_KINDS}
    )


@router.get("/trainer/rankings")
def rankings_page(request: Request, trainer: Trainer, session: SessionDep) -> Response:
    answers = [_answer_json(r) for r in my_answers(session, trainer)]
    return render(request, "trainer/rankings.html", {"answers": answers})


@cache
def guide_html(path: Path = GUIDE_FILE) -> Markup:
    """The labeling guide as HTML: raw HTML in the markdown is escaped, then the result is sanitised."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    return Markup(nh3.clean(md.render(path.read_text(encoding="utf-8"))))


@router.get("/guide")
def guide(request: Request, trainer: Trainer) -> Response:
    """The labeling guide: what trainers prefer when they write and rank."""
    return render(request, "trainer/guide.html", {"guide": guide_html()})
