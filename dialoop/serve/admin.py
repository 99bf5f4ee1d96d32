"""Admin pages: users and roles, the collection dashboard, iterations, model versions, blind A/B tests.

Every `/admin` route needs the admin role and, when it changes something, the CSRF token (both are
router dependencies). `/ab` is where trainers judge A/B tests: two replies labelled A and B in their own
random order, never with the versions' names.

    GET  /admin                            counts, agreement, rankings per trainer, flags, demonstrations
    GET  /admin/users                      POST /admin/users, /admin/users/{id}/role|password|delete
    GET  /admin/iterations                 POST /admin/iterations (start), /admin/jobs/{id}/cancel
    GET  /admin/api/jobs[/{id}]            live progress (polled by the page)
    GET  /admin/versions                   report cards; POST /admin/versions/serve (hot swap)
    GET  /admin/ab, /admin/ab/{id}         POST /admin/ab (queue a test), /admin/ab/{id}/close
    GET  /ab                               POST /ab/{task_id} (a trainer's choice)
"""

from __future__ import annotations

import asyncio
import mimetypes
import random
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from dialoop.collect import (
    TaskView,
    collection_counts,
    display_order,
    pairwise_agreement,
    review_demonstration,
)
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
from dialoop.collect.flags import OUTCOMES, open_flags, resolve_flags
from dialoop.collect.tasks import skip_task
from dialoop.serve.auth import csrf_protect, require_role
from dialoop.serve.deps import RegistryDep, SessionDep, WorkerDep
from dialoop.serve.jobs import IterationSettings, JobManager, JobRunning, job_manager
from dialoop.serve.models import ModelRegistry, UnknownModel, version_id_of
from dialoop.serve.pages import add_nav_link, render
from dialoop.serve.worker import ContextTooLong, GenerationWorker, QueueFull
from dialoop.store.accounts import create_user, delete_user, list_users, set_password, set_role
from dialoop.store.models import ROLES, ComparisonTask, Conversation, Message, ModelVersion, TrainingRun, User
from dialoop.store.registry import list_model_versions
from dialoop.store.stats import store_stats

AdminUser = Annotated[User, Depends(require_role("admin"))]
TrainerUser = Annotated[User, Depends(require_role("trainer", "admin"))]
JobsDep = Annotated[JobManager, Depends(job_manager)]

admin_router = APIRouter(
    prefix="/admin",
    include_in_schema=False,
    dependencies=[Depends(require_role("admin")), Depends(csrf_protect)],
)
ab_router = APIRouter(
    include_in_schema=False, dependencies=[Depends(require_role("trainer", "admin")), Depends(csrf_protect)]
)
router = APIRouter()  # what app.py includes: both of the above

add_nav_link("Admin", "/admin", "admin")
add_nav_link("A/B", "/ab", "trainer", "admin")

MAX_AB_PROMPTS = 200
REPORT_FILE = re.compile(r"[\w.-]+\.(png|json|jsonl|html)")
# the report page may quote model replies: it is opened sandboxed with no script at all (its own origin
# kept, so that its plots load with the admin's cookie)
REPORT_HTML_CSP = (
    "sandbox allow-same-origin; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"
)


def _redirect(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


def _user_names(session: Session) -> dict[int, str]:
    return {u.id: u.name for u in list_users(session)}


# --- dashboard ------------------------------------------------------------------------------------


def _pending_demonstrations(session: Session) -> list[Conversation]:
    query = (
        select(Conversation)
        .where(Conversation.kind == "demonstration", Conversation.status == "submitted")
        .order_by(Conversation.updated_at, Conversation.id)
        .options(selectinload(Conversation.messages), selectinload(Conversation.owner))
    )
    return list(session.scalars(query))


@admin_router.get("")
def dashboard(request: Request, session: SessionDep) -> Response:
    """Collection counts, rankings per trainer with their agreement, open flags, demonstrations to review."""
    agreement = pairwise_agreement(session)
    trainers = sorted(agreement.trainers.values(), key=lambda t: t.name)
    context = {
        "counts": collection_counts(session),
        "store": store_stats(session),
        "agreement": agreement,
        "trainers": trainers,
        "flags": open_flags(session),
        "names": _user_names(session),
        "outcomes": OUTCOMES,
        "demonstrations": _pending_demonstrations(session),
    }
    return render(request, "admin/dashboard.html", context)


@admin_router.post("/demonstrations/{conversation_id}/review")
def review(
    conversation_id: int, admin: AdminUser, session: SessionDep, decision: Annotated[str, Form()]
) -> RedirectResponse:
    """Accept or reject a submitted demonstration."""
    if decision not in ("accept", "reject"):
        raise HTTPException(400, "decision must be accept or reject")
    conversation = session.get(Conversation, conversation_id)
    if conversation is None or conversation.kind != "demonstration":
        raise HTTPException(404, f"no demonstration with id {conversation_id}")
    try:
        review_demonstration(session, conversation, admin, accept=decision == "accept")
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from exc
    return _redirect("/admin#demonstrations")


@admin_router.post("/flags/{message_id}/resolve")
def resolve_flag(
    message_id: int,
    admin: AdminUser,
    session: SessionDep,
    outcome: Annotated[str, Form()],
    note: Annotated[str, Form(max_length=2000)] = "",
) -> RedirectResponse:
    """Close the open flags on one reply: upheld (the reply is bad) or dismissed."""
    try:
        resolve_flags(session, message_id, admin, outcome, note)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    return _redirect("/admin#flags")


# --- users ----------------------------------------------------------------------------------------


def _users_page(request: Request, session: Session, *, status_code: int = 200, **context: Any) -> Response:
    ranked = {t.trainer_id: t.rankings for t in pairwise_agreement(session).trainers.values()}
    return render(
        request,
        "admin/users.html",
        {"users": list_users(session), "roles": ROLES, "ranked": ranked, **context},
        status_code=status_code,
    )


def _one_time_password() -> str:
    return secrets.token_urlsafe(12)


def _target(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise HTTPException(404, f"no user with id {user_id}")
    return user


@admin_router.get("/users")
def users_page(request: Request, session: SessionDep) -> Response:
    return _users_page(request, session)


@admin_router.post("/users")
def add_user(
    request: Request,
    session: SessionDep,
    name: Annotated[str, Form(max_length=100)],
    role: Annotated[str, Form()],
    password: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """Create an account; without a password, a one-time password is made and shown on this page only."""
    chosen = password or _one_time_password()
    try:
        user = create_user(session, name.strip(), role, chosen)
    except ValueError as exc:
        return _users_page(
            request, session, status_code=400, error=str(exc), form={"name": name, "role": role}
        )
    shown = None if password else {"name": user.name, "password": chosen}
    return _users_page(request, session, one_time=shown, message=f"Created {user.name} ({user.role}).")


@admin_router.post("/users/{user_id}/role")
def change_role(
    request: Request, user_id: int, admin: AdminUser, session: SessionDep, role: Annotated[str, Form()]
) -> Response:
    user = _target(session, user_id)
    if user.id == admin.id:
        return _users_page(request, session, status_code=400, error="You cannot change your own role.")
    try:
        set_role(session, user, role)
    except ValueError as exc:
        return _users_page(request, session, status_code=400, error=str(exc))
    return _users_page(request, session, message=f"{user.name} is now {role}.")


@admin_router.post("/users/{user_id}/password")
def reset_password(request: Request, user_id: int, session: SessionDep) -> Response:
    """Replace the password with a one-time one, shown once; the user's open sessions end."""
    user = _target(session, user_id)
    chosen = _one_time_password()
    set_password(session, user, chosen)
    return _users_page(
        request,
        session,
        one_time={"name": user.name, "password": chosen},
        message=f"Reset {user.name}'s password.",
    )


@admin_router.post("/users/{user_id}/delete")
def remove_user(request: Request, user_id: int, admin: AdminUser, session: SessionDep) -> Response:
    """Delete an account; its conversations and rankings stay, without an owner."""
    user = _target(session, user_id)
    if user.id == admin.id:
        return _users_page(request, session, status_code=400, error="You cannot delete your own account.")
    name = user.name
    try:
        delete_user(session, user)
    except ValueError as exc:
        return _users_page(request, session, status_code=400, error=str(exc))
    return _users_page(request, session, message=f"Deleted {name}.")


# --- iterations -----------------------------------------------------------------------------------


def _default_base_model(session: Session, registry: ModelRegistry) -> str:
    """Where SFT starts unless the admin says otherwise: the store's first base model, else the server's."""
    base = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.kind == "policy", ModelVersion.run_id.is_(None))
        .order_by(ModelVersion.id)
    ).first()
    return base.path if base is not None else registry.base.path


def _iterations_page(
    request: Request,
    session: Session,
    registry: ModelRegistry,
    jobs: JobManager,
    *,
    status_code: int = 200,
    **context: Any,
) -> Response:
    runs = list(session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(30)))
    defaults = IterationSettings(base_model=_default_base_model(session, registry)).model_dump()
    return render(
        request,
        "admin/iterations.html",
        {
            "jobs": [jobs.progress(j) for j in jobs.list()],
            "runs": runs,
            "values": {**defaults, **context.pop("values", {})},
            **context,
        },
        status_code=status_code,
    )


@admin_router.get("/iterations")
def iterations_page(request: Request, session: SessionDep, registry: RegistryDep, jobs: JobsDep) -> Response:
    return _iterations_page(request, session, registry, jobs)


def _settings_from_form(form: dict[str, str]) -> IterationSettings:
    """The form's fields as settings: blank fields keep their defaults, the deploy box is on when sent."""
    fields = {k: v.strip() for k, v in form.items() if k in IterationSettings.model_fields and k != "deploy"}
    given: dict[str, Any] = {k: v for k, v in fields.items() if v}
    return IterationSettings(**given, deploy="deploy" in form)


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


@admin_router.post("/iterations")
async def start_iteration(
    request: Request, admin: AdminUser, session: SessionDep, registry: RegistryDep, jobs: JobsDep
) -> Response:
    """Start an iteration (SFT on new demonstrations, RM on all rankings, PPO) with the form's settings."""
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    try:
        chosen = _settings_from_form(form)
    except ValidationError as exc:
        message = _validation_message(exc)
        return _iterations_page(request, session, registry, jobs, status_code=400, error=message, values=form)
    try:
        job = await jobs.start(chosen, started_by=admin.name)
    except JobRunning as exc:
        return _iterations_page(
            request, session, registry, jobs, status_code=409, error=str(exc), values=form
        )
    return _redirect(f"/admin/iterations#job-{job.id}")


@admin_router.get("/api/jobs")
def jobs_progress(jobs: JobsDep) -> list[dict[str, Any]]:
    return [jobs.progress(j) for j in jobs.list()]


@admin_router.get("/api/jobs/{job_id}")
def job_progress(job_id: int, jobs: JobsDep) -> dict[str, Any]:
    try:
        return jobs.progress(jobs.get(job_id))
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc


@admin_router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: int, jobs: JobsDep) -> RedirectResponse:
    try:
        jobs.cancel(job_id)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from exc
    return _redirect(f"/admin/iterations#job-{job_id}")


# --- model versions -------------------------------------------------------------------------------


def report_dir(version: ModelVersion) -> Path | None:
    """The report card written by the iteration that trained `version` (`iter-N/report`), if any."""
    if version.run_id is None:
        return None
    folder = Path(version.path).parent / "report"
    return folder if (folder / "report.json").is_file() else None


@admin_router.get("/versions")
def versions_page(request: Request, session: SessionDep, registry: RegistryDep) -> Response:
    """Every model version with its lineage, run and report card; which policy is served."""
    versions = list(reversed(list_model_versions(session)))
    reports: dict[int, list[str]] = {}  # the newest version of an iteration shows its report's files
    report_of: dict[int, str] = {}  # the iteration's other versions name that version
    shown: dict[Path, str] = {}
    for v in versions:
        folder = report_dir(v)
        if folder is None:
            continue
        if folder in shown:
            report_of[v.id] = shown[folder]
        else:
            shown[folder] = v.name
            reports[v.id] = sorted(p.name for p in folder.iterdir() if REPORT_FILE.fullmatch(p.name))
    context = {
        "versions": versions,
        "reports": reports,
        "report_of": report_of,
        "servable": registry.entries(),
        "served": registry.served,
        "loaded": registry.loaded(),
    }
    return render(request, "admin/versions.html", context)


@admin_router.post("/versions/serve")
async def serve_version(
    registry: RegistryDep, name: Annotated[str, Form(max_length=200)]
) -> RedirectResponse:
    """Serve `name` from now on: it is loaded first; requests in flight finish on their model."""
    try:
        await registry.set_served(name)
    except UnknownModel as exc:
        raise HTTPException(404, str(exc)) from exc
    return _redirect("/admin/versions")


@admin_router.get("/versions/{version_id}/report/{filename}")
def report_file(version_id: int, filename: str, session: SessionDep) -> FileResponse:
    """A file of a version's report card (plots, report.json, report.html)."""
    version = session.get(ModelVersion, version_id)
    folder = report_dir(version) if version is not None else None
    if folder is None or not REPORT_FILE.fullmatch(filename) or not (folder / filename).is_file():
        raise HTTPException(404, "no such report file")
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    if filename.endswith(".html"):
        headers["Content-Security-Policy"] = REPORT_HTML_CSP
    media_type = "application/x-ndjson" if filename.endswith(".jsonl") else mimetypes.guess_type(filename)[0]
    return FileResponse(folder / filename, media_type=media_type, headers=headers)


# --- blind A/B tests ------------------------------------------------------------------------------


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
    from dialoop.evaluate.card import EvalConfig, eval_prompts

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
        )
    except UnknownModel as exc:
        return refuse(str(exc), 404)
    except QueueFull as exc:
        return refuse(f"{exc}: the server is busy; try again in a minute", 503)
    except ContextTooLong as exc:
        return refuse(str(exc))
    sampling = {"max_new_tokens": max_tokens, "temperature": temperature, "top_p": 1.0, "seed": seed}
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
    return _redirect(f"/admin/ab/{test.id}")


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
    return _redirect(f"/admin/ab/{test_id}")


# --- the trainers' A/B page -----------------------------------------------------------------------

LABELS = ("A", "B")


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
    return _redirect("/ab")


router.include_router(admin_router)
router.include_router(ab_router)
