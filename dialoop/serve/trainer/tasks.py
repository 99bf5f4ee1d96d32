"""Comparison tasks: a trainer's next task (made on demand from unused model replies), rankings, skips."""

from __future__ import annotations

import logging
import random
from typing import Any

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from dialoop.collect import (
    PolicyHandle,
    TaskView,
    create_comparison_tasks,
    next_task_for,
    skip_task,
    submit_ranking,
    task_view,
)
from dialoop.collect.tasks import CHAT_SOURCE, answers_of
from dialoop.serve.deps import EngineDep, RegistryDep, SessionDep
from dialoop.serve.models import LoadedModel, ModelRegistry, UnknownModel, version_id_of
from dialoop.serve.trainer.common import Trainer, collect_errors, router, trainer_settings, trainer_state
from dialoop.serve.trainer.schemas import RankingIn, SkipIn
from dialoop.store.db import session_scope
from dialoop.store.models import ComparisonTask, Ranking, User, utc_iso

log = logging.getLogger(__name__)


def answer_json(ranking: Ranking) -> dict[str, Any]:
    return {
        "task_id": ranking.task_id,
        "order": ranking.order,
        "ties": ranking.ties,
        "all_bad": ranking.all_bad,
        "flags": ranking.flags,
        "skip_reason": ranking.skip_reason,
        "created_at": utc_iso(ranking.created_at),
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
        "answer": answer_json(mine) if mine is not None else None,
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
    state = trainer_state(request)
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


def task_for(session: Session, trainer: User, task_id: int) -> ComparisonTask:
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
    return task_json(task_view(session, task_for(session, trainer, task_id), trainer), trainer)


@router.post("/api/trainer/tasks/{task_id}/ranking")
def rank(task_id: int, body: RankingIn, trainer: Trainer, session: SessionDep) -> dict[str, Any]:
    """My ranking of a task (replacing my earlier answer to it)."""
    task = task_for(session, trainer, task_id)
    with collect_errors():
        ranking = submit_ranking(session, task, trainer, body.order, body.ties, body.all_bad, body.flags)
    return answer_json(ranking)


@router.post("/api/trainer/tasks/{task_id}/skip")
def skip(task_id: int, body: SkipIn, trainer: Trainer, session: SessionDep) -> dict[str, Any]:
    """Skip a task with a reason; flags raised on its replies are kept."""
    task = task_for(session, trainer, task_id)
    with collect_errors():
        ranking = skip_task(session, task, trainer, body.reason, body.flags)
    return answer_json(ranking)


@router.get("/api/trainer/rankings")
def list_answers(trainer: Trainer, session: SessionDep) -> list[dict[str, Any]]:
    return [answer_json(r) for r in answers_of(session, trainer)]
