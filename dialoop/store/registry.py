"""Model versions (with lineage and the one served policy) and training runs.

Functions take a session and only flush; the caller's `session_scope` commits (`ensure_base_version_id`
alone commits a session of its own).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from dialoop.store.db import session_scope
from dialoop.store.models import ModelVersion, TrainingRun, utcnow

log = logging.getLogger(__name__)

MODEL_KINDS = ("policy", "reward")
STAGES = ("sft", "rm", "ppo")


def _resolve(session: Session, cls: type[Any], ref: Any) -> Any:
    """`ref` as a row of `cls`: None, a row, or an id (LookupError when that id does not exist)."""
    if ref is None or isinstance(ref, cls):
        return ref
    row = session.get(cls, ref)
    if row is None:
        raise LookupError(f"no {cls.__tablename__[:-1].replace('_', ' ')} with id {ref}")
    return row


def register_model_version(
    session: Session,
    *,
    name: str,
    kind: str,
    path: str | Path,
    parent: ModelVersion | int | None = None,
    run: TrainingRun | int | None = None,
    metrics: dict[str, Any] | None = None,
) -> ModelVersion:
    """Record a model directory as a new version; ValueError on a bad kind, empty or duplicate name."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"invalid model kind {kind!r}: choose one of {', '.join(MODEL_KINDS)}")
    if not name or len(name) > 200:
        raise ValueError("a model version name is 1-200 characters")
    if model_version_by_name(session, name) is not None:
        raise ValueError(f"a model version named {name!r} already exists")
    version = ModelVersion(
        name=name,
        kind=kind,
        path=str(path),
        parent=_resolve(session, ModelVersion, parent),
        run=_resolve(session, TrainingRun, run),
        metrics=dict(metrics or {}),
    )
    session.add(version)
    session.flush()
    log.info("registered %s model %s at %s", kind, name, path)
    return version


def model_version_by_name(session: Session, name: str) -> ModelVersion | None:
    """The model version called `name`, or None."""
    return session.scalars(select(ModelVersion).where(ModelVersion.name == name)).first()


def list_model_versions(session: Session, kind: str | None = None) -> list[ModelVersion]:
    """All model versions (of `kind` when given), oldest first."""
    query = select(ModelVersion).order_by(ModelVersion.id)
    if kind is not None:
        query = query.where(ModelVersion.kind == kind)
    return list(session.scalars(query))


def first_base_policy(session: Session) -> ModelVersion | None:
    """The oldest policy version that no run trained (a base model), or None."""
    query = (
        select(ModelVersion)
        .where(ModelVersion.kind == "policy", ModelVersion.run_id.is_(None))
        .order_by(ModelVersion.id)
    )
    return session.scalars(query).first()


def recent_runs(session: Session, limit: int = 30) -> list[TrainingRun]:
    """The newest training runs, newest first."""
    return list(session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)))


def served_model(session: Session) -> ModelVersion | None:
    """The policy version the server should serve, or None when none is chosen."""
    return session.scalars(
        select(ModelVersion)
        .where(ModelVersion.served.is_(True), ModelVersion.kind == "policy")
        .order_by(ModelVersion.id.desc())
    ).first()


def set_served(session: Session, version_id: int) -> ModelVersion:
    """Make policy `version_id` the only served one; LookupError if unknown, ValueError if not a policy."""
    version = _resolve(session, ModelVersion, version_id)
    if version.kind != "policy":
        raise ValueError(f"model version {version.name!r} is a {version.kind} model; only a policy is served")
    # one statement over every policy row, so concurrent calls still leave exactly one served
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.kind == "policy")
        .values(served=ModelVersion.id == version.id)
        .execution_options(synchronize_session="fetch")
    )
    session.flush()
    session.refresh(version)
    log.info("serving model %s", version.name)
    return version


def start_run(
    session: Session,
    stage: str,
    config: dict[str, Any],
    data: dict[str, Any],
    run_dir: str | Path,
    iteration: int = 0,
) -> TrainingRun:
    """Record a training stage that starts now; `data` names exactly what it trains on."""
    if stage not in STAGES:
        raise ValueError(f"invalid training stage {stage!r}: choose one of {', '.join(STAGES)}")
    run = TrainingRun(
        stage=stage,
        config=dict(config),
        data=dict(data),
        run_dir=str(run_dir),
        iteration=iteration,
        status="running",
        started_at=utcnow(),
    )
    session.add(run)
    session.flush()
    log.info("started %s run %d in %s", stage, run.id, run_dir)
    return run


def _check_running(run: TrainingRun) -> None:
    if run.status != "running":
        raise ValueError(f"training run {run.id} is {run.status}, not running")


def finish_run(session: Session, run: TrainingRun, metrics: dict[str, Any]) -> None:
    """Mark a running run done with its final metrics."""
    _check_running(run)
    run.status, run.metrics, run.finished_at = "done", dict(metrics), utcnow()
    session.flush()


def fail_run(session: Session, run: TrainingRun, error: str) -> None:
    """Mark a running run failed with the error that stopped it."""
    _check_running(run)
    run.status, run.error, run.finished_at = "failed", error, utcnow()
    session.flush()


def ensure_base_version(session: Session, path: str | Path, name: str = "base") -> ModelVersion:
    """The policy version of the base model at `path`, registered (as `name`, `name-2`, ...) if new."""
    found = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.path == str(path), ModelVersion.kind == "policy", ModelVersion.run_id.is_(None))
        .order_by(ModelVersion.id)
    ).first()
    if found is not None:
        return found
    free, k = name, 1
    while model_version_by_name(session, free) is not None:
        k += 1
        free = f"{name}-{k}"
    return register_model_version(session, name=free, kind="policy", path=path)


def ensure_base_version_id(engine: Engine, path: str | Path, name: str = "base", attempts: int = 5) -> int:
    """`ensure_base_version` in a session of its own, for server processes that may race to register the
    same base model: the loser's insert fails (the unique name; on SQLite also "database is locked", its
    read snapshot being stale), and a fresh session then finds the winner's row."""
    for attempt in range(attempts):
        try:
            with session_scope(engine) as session:
                return ensure_base_version(session, path, name).id
        except (IntegrityError, OperationalError):
            if attempt == attempts - 1:
                raise
            log.info("another process registered %s first; looking again", path)
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")
