"""Iterations started from the admin page (SFT, RM, PPO with the form's settings) and their live progress."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from dialoop.iteration import IterationKnobs
from dialoop.serve.admin.common import AdminUser, admin_router, redirect
from dialoop.serve.deps import RegistryDep, SessionDep
from dialoop.serve.jobs import IterationSettings, JobManager, JobRunning, iteration_knobs, job_manager
from dialoop.serve.models import ModelRegistry
from dialoop.serve.pages import render
from dialoop.store.registry import first_base_policy, recent_runs

JobsDep = Annotated[JobManager, Depends(job_manager)]


def _default_base_model(session: Session, registry: ModelRegistry) -> str:
    """Where SFT starts unless the admin says otherwise: the store's first base model, else the server's."""
    base = first_base_policy(session)
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
    runs = recent_runs(session)
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


def _settings_from_form(form: dict[str, str]) -> IterationKnobs:
    """The form's fields as knobs: blank fields keep their defaults, a check box is on when sent."""
    boxes = ("deploy", "rm_feedback")
    fields = {k: v.strip() for k, v in form.items() if k in IterationSettings.model_fields and k not in boxes}
    given: dict[str, Any] = {k: v for k, v in fields.items() if v}
    return iteration_knobs({**given, **{box: box in form for box in boxes}})


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
    return redirect(f"/admin/iterations#job-{job.id}")


@admin_router.get("/api/jobs")
def jobs_progress(jobs: JobsDep) -> list[dict[str, Any]]:
    return [jobs.progress(j) for j in jobs.list()]


@admin_router.get("/api/jobs/{job_id}")
def job_progress(job_id: int, jobs: JobsDep) -> dict[str, Any]:
    try:
        return jobs.progress(jobs.get(job_id))
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc


@admin_router.post("/jobs/{job_id}/resume")
async def resume_job(job_id: int, admin: AdminUser, jobs: JobsDep) -> RedirectResponse:
    """Start an interrupted, cancelled or failed job again with its settings (it continues where it
    stopped)."""
    try:
        job = await jobs.resume(job_id, started_by=admin.name)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    except (ValueError, JobRunning) as exc:
        raise HTTPException(409, str(exc)) from exc
    return redirect(f"/admin/iterations#job-{job.id}")


@admin_router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: int, jobs: JobsDep) -> RedirectResponse:
    try:
        jobs.cancel(job_id)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from exc
    return redirect(f"/admin/iterations#job-{job_id}")
