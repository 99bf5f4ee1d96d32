"""Blind A/B tests: admins queue and read them; trainers judge them on `/ab`.

A trainer sees two replies labelled A and B in their own random order, never with the versions' names.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from dialoop.collect import TaskView, display_order
from dialoop.collect.abtest import (
    AB_SOURCE,
    ABPair,
    ab_result,
    close_ab_test,
    create_ab_test,
    judge_ab_task,
    list_ab_tests,
    next_ab_task,
    recent_user_prompts,
)
from dialoop.collect.tasks import skip_task
from dialoop.evaluate.card import EvalConfig, eval_prompts
from dialoop.serve.admin.common import AdminUser, TrainerUser, ab_router, admin_router, redirect
from dialoop.serve.deps import RegistryDep, SessionDep, WorkerDep
from dialoop.serve.generation import owner_of, refusal_of
from dialoop.serve.models import ModelRegistry, UnknownModel, version_id_of
from dialoop.serve.pages import render
from dialoop.serve.worker import GenerationWorker, QueueFull
from dialoop.store.models import ComparisonTask, Message, ModelVersion
from dialoop.store.registry import list_model_versions

MAX_AB_PROMPTS = 200
LABELS = ("A", "B")


def _ab_choices(session: Session, registry: ModelRegistry) -> list[str]:
    """Names of the policies an A/B test can compare: the store's, and the model the server started with."""
    names = [v.name for v in list_model_versions(session, "policy")]
    return names if registry.base.name in names else [registry.base.name, *names]


def _ab_page(
    request: Request, session: Session, registry: ModelRegistry, *, status_code: int = 200, **context: Any
) -> Response:
    return render(
        request,
        "admin/ab_list.html",
        {
            "tests": list_ab_tests(session),
            "choices": _ab_choices(session, registry),
            "served": registry.served,
            "values": context.pop("values", {}),
            **context,
        },
        status_code=status_code,
    )


@admin_router.get("/ab")
def ab_page(request: Request, session: SessionDep, registry: RegistryDep) -> Response:
    return _ab_page(request, session, registry)


def _eval_prompts(count: int, seed: int) -> list[str]:
    return [p.text for p in eval_prompts(EvalConfig(prompts=count, seed=seed))]


def _version_for(session: Session, registry: ModelRegistry, name: str) -> ModelVersion:
    """The store version called `name`; the server's own base model is registered on first use."""
    return session.get_one(ModelVersion, version_id_of(session, registry.resolve(name)))


async def _sample_pairs(
    worker: GenerationWorker,
    models: tuple[str, str],
    prompts: Sequence[str],
    *,
    max_tokens: int,
    temperature: float,
    seed: int,
    owner: str,
) -> list[ABPair]:
    """Both versions' replies to every prompt through the server's worker, with the same seed per prompt."""
    pairs: list[ABPair] = []
    chunk = max(1, min(worker.max_batch, worker.max_queue) // 2)
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        generations = [
            await worker.submit(
                [{"role": "user", "content": prompt}],
                model=model,
                owner=owner,
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed + start + i,  # common random numbers: only the model differs within a pair
            )
            for i, prompt in enumerate(part)
            for model in models
        ]
        results = await asyncio.gather(*(g.result() for g in generations))
        for i, prompt in enumerate(part):
            (a,), (b,) = results[2 * i], results[2 * i + 1]
            pairs.append(ABPair(prompt, a.text, b.text, a.finish_reason == "stop", b.finish_reason == "stop"))
    return pairs


@admin_router.post("/ab")
async def create_ab(
    request: Request,
    admin: AdminUser,
    session: SessionDep,
    registry: RegistryDep,
    worker: WorkerDep,
    version_a: Annotated[str, Form(max_length=200)],
    version_b: Annotated[str, Form(max_length=200)],
    source: Annotated[str, Form()] = "eval",
    count: Annotated[int, Form()] = 20,
    custom: Annotated[str, Form(max_length=200_000)] = "",
    overlap: Annotated[int, Form()] = 1,
    max_tokens: Annotated[int, Form()] = 128,
    temperature: Annotated[float, Form()] = 0.7,
    seed: Annotated[int, Form()] = 0,
) -> Response:
    """Sample both versions' replies to N prompts and queue one blind task per prompt."""
    values = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}

    def refuse(message: str, status: int = 400) -> Response:
        return _ab_page(request, session, registry, status_code=status, error=message, values=values)

    problems = [
        f"{label} must be {limits}"
        for label, ok, limits in (
            ("the number of prompts", 1 <= count <= MAX_AB_PROMPTS, f"1 to {MAX_AB_PROMPTS}"),
            ("overlap", 1 <= overlap <= 20, "1 to 20"),
            ("max tokens", 1 <= max_tokens <= 4096, "1 to 4096"),
            ("temperature", 0 <= temperature <= 5, "0 to 5"),
            ("seed", 0 <= seed < 2**31 - MAX_AB_PROMPTS, "a non-negative integer"),
        )
        if not ok
    ]
    if version_a == version_b:
        problems.append("choose two different versions")
    if source not in ("eval", "recent", "custom"):
        problems.append("the prompts come from eval, recent or custom")
    if problems:
        return refuse("; ".join(problems) + ".")
    if source == "eval":
        prompts = _eval_prompts(count, seed)
    elif source == "recent":
        prompts = recent_user_prompts(session, count)
    else:
        prompts = [line.strip() for line in custom.splitlines() if line.strip()][:MAX_AB_PROMPTS]
    if not prompts:
        return refuse("there are no prompts from that source yet")
    session.commit()  # nothing written yet: hold no transaction open while the replies are sampled
    try:
        pairs = await _sample_pairs(
            worker,
            (version_a, version_b),
            prompts,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            owner=owner_of(admin.id),
        )
    except (QueueFull, UnknownModel, ValueError) as exc:
        return refuse(str(exc), refusal_of(exc).status)
    sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": 1.0, "seed": seed}
    try:
        versions = _version_for(session, registry, version_a), _version_for(session, registry, version_b)
        test = create_ab_test(
            session,
            admin,
            versions[0],
            versions[1],
            pairs,
            rng=random.Random(secrets.randbits(64)),
            overlap=overlap,
            sampling=sampling,
        )
    except (ValueError, LookupError) as exc:  # UnknownModel too: a version deleted meanwhile
        return refuse(str(exc))
    return redirect(f"/admin/ab/{test.id}")


@admin_router.get("/ab/{test_id}")
def ab_result_page(request: Request, test_id: int, session: SessionDep) -> Response:
    """Version B's win rate over version A, ties counting half, with its 95% Wilson interval."""
    try:
        result = ab_result(session, test_id)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    return render(request, "admin/ab_result.html", {"result": result, "interval": result.interval_b()})


@admin_router.post("/ab/{test_id}/close")
def close_ab(test_id: int, admin: AdminUser, session: SessionDep) -> RedirectResponse:
    """Withdraw the test's open tasks; the judgements so far stay."""
    try:
        close_ab_test(session, test_id, admin)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    return redirect(f"/admin/ab/{test_id}")


# --- the trainers' A/B page -----------------------------------------------------------------------


def _labelled(view: TaskView) -> list[tuple[str, Message]]:
    return [(label, c.message) for label, c in zip(LABELS, view.candidates, strict=True)]


@ab_router.get("/ab")
def ab_judge_page(request: Request, user: TrainerUser, session: SessionDep) -> Response:
    """The next A/B task for this trainer: a prompt and two replies labelled in a random order."""
    view = next_ab_task(session, user)
    context: dict[str, Any] = {"task": None}
    if view is not None:
        context = {"task": view.task, "prompt": view.context, "replies": _labelled(view)}
    return render(request, "admin/ab_judge.html", context)


@ab_router.post("/ab/{task_id}")
def ab_answer(
    task_id: int,
    user: TrainerUser,
    session: SessionDep,
    choice: Annotated[str, Form()],
    reason: Annotated[str, Form(max_length=2000)] = "",
) -> RedirectResponse:
    """A, B, tie, or skip (with a reason); labels are this trainer's, mapped back to the candidates."""
    task = session.get(ComparisonTask, task_id)
    if task is None or task.source != AB_SOURCE:
        raise HTTPException(404, f"no A/B task with id {task_id}")
    shown = dict(zip(LABELS, display_order(task, user), strict=True))
    try:
        if choice == "skip":
            skip_task(session, task, user, reason)
        elif choice == "tie":
            judge_ab_task(session, task, user, None)
        elif choice in shown:
            judge_ab_task(session, task, user, shown[choice].index)
        else:
            raise ValueError("choose A, B, tie or skip")
    except PermissionError as exc:
        raise HTTPException(403, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    return redirect("/ab")
