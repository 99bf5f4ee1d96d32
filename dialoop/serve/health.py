"""Probes for load balancers and orchestrators: liveness (`/healthz`) and readiness (`/readyz`).

GET /healthz  -> 200 {"status": "ok"} whenever the process answers
GET /readyz   -> 200 {"status": "ready"} when the store answers and the worker has the served model
                 loaded (with --inference-url: when the remote backend runs);
                 else 503 {"status": "unavailable", "reason": "..."}
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from dialoop.serve.deps import EngineDep, RegistryDep, WorkerDep
from dialoop.serve.remote import RemoteBackend

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(engine: EngineDep, registry: RegistryDep, worker: WorkerDep) -> JSONResponse:
    def store_answers() -> None:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    try:
        await run_in_threadpool(store_answers)
    except Exception as exc:  # any failure means "not ready"; the probe must answer, not raise
        log.warning("readiness: the store does not answer: %s", exc)
        return _unavailable(f"the store does not answer: {type(exc).__name__}")
    if not worker.running:
        return _unavailable("the generation worker is not running")
    if isinstance(worker, RemoteBackend):  # generation happens upstream: no model here
        return JSONResponse({"status": "ready"})
    if registry.served not in registry.loaded():
        return _unavailable(f"model `{registry.served}` is not loaded yet")
    return JSONResponse({"status": "ready"})


def _unavailable(reason: str) -> JSONResponse:
    return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
