"""Iterations started from the admin page: `dialoop iterate` in a subprocess, its live progress, cancel.

    jobs = job_manager(request)                       # one per app
    job = await jobs.start(iteration_knobs({"ppo_steps": 20}), started_by="root")
    jobs.progress(job)                                # stages, steps, metrics, ETA, log tail (polled)
    jobs.cancel(job.id)                               # SIGINT: the run is marked failed, resumes next time
    await jobs.resume(job.id, started_by="root")      # a new job with the same settings, continuing the run

Jobs are rows of the store's `admin_jobs`, so every server process lists the same jobs and they outlive a
restart. The process that started a job owns it: it watches the child, writes its outcome and beats a
heartbeat into the row. A job whose owner stopped (a restart, a crash) shows as `interrupted`: at a clean
shutdown the owner says so itself; after a crash, other processes see the heartbeat go stale.

The child is the real CLI on the server's store and home, in its own process group, so that cancelling
stops its whole tree and a crash of either side leaves the other alone. Progress is read from the files
the loop writes: `iter-N/progress.json` (`dialoop.iteration.IterationProgress`), each stage's
`metrics.jsonl` and `train_config.json`; the log is only shown. The child does not deploy: when the
iteration succeeds the server hot-swaps to the new policy itself (if asked), so requests in flight keep
the model they started with.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, create_model
from sqlalchemy import Engine, select

from dialoop.iteration import PROGRESS_FILE, STAGES, IterationKnobs, IterationProgress
from dialoop.run_metrics import METRICS_FILE
from dialoop.serve.models import ModelRegistry
from dialoop.settings import settings
from dialoop.store.db import session_scope
from dialoop.store.models import AdminJob, ModelVersion, utcnow

log = logging.getLogger(__name__)

# SIGINT is how a job is cancelled: the child turns it back into KeyboardInterrupt even when the server was
# started with SIGINT ignored (`nohup dialoop serve &`, a non-interactive shell's `&`), which children inherit
_CLI = (
    "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from dialoop.cli import app; app(prog_name='dialoop')"
)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_SHOWN_METRICS = ("loss", "accuracy", "score", "kl", "reply_length")
_LOG_TAIL_BYTES = 64_000
HEARTBEAT_S = 5.0  # how often the owning process marks a running job alive
STALE_S = 30.0  # a running job whose heartbeat is older than this lost its server: it is interrupted
INTERRUPTED = "interrupted: the server stopped while it ran; resume it to continue where it stopped"


def _settings_model() -> type[BaseModel]:
    """The pydantic model of `IterationKnobs`: its fields, defaults and bounds; unknown fields are errors."""
    hints = typing.get_type_hints(IterationKnobs)
    fields: dict[str, Any] = {
        f.name: (
            hints[f.name],
            Field(default=f.default, description=f.metadata["help"], **f.metadata["bounds"]),
        )
        for f in dataclasses.fields(IterationKnobs)
    }
    return create_model(
        "IterationSettings", __config__=ConfigDict(extra="forbid"), __doc__=IterationKnobs.__doc__, **fields
    )


# what the admin form is validated against
IterationSettings = _settings_model()


def iteration_knobs(values: Mapping[str, Any]) -> IterationKnobs:
    """The knobs `values` set (the admin form's); pydantic's ValidationError when one is unknown or out of
    bounds."""
    return IterationKnobs(**IterationSettings.model_validate(values).model_dump())


def cli_args(knobs: IterationKnobs) -> list[str]:
    """The options of `dialoop iterate` for `knobs` (`--name=value`, so no value is read as an option;
    booleans as `--name`/`--no-name`); the child never deploys, so `deploy` is left out."""
    args = []
    for name, value in dataclasses.asdict(knobs).items():
        flag = name.replace("_", "-")
        if name == "deploy" or value is None:
            continue
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args.append(f"--{flag}={value}")
    return args


class JobRunning(RuntimeError):
    """An iteration is running already: one at a time."""


@dataclass
class IterationJob:
    """One `dialoop iterate` started from the web, and what became of it."""

    id: int
    settings: IterationKnobs
    started_by: str
    log_path: Path
    started_at: float = field(default_factory=time.time)
    status: str = "running"  # running | done | failed | cancelled | interrupted
    finished_at: float | None = None
    returncode: int | None = None
    error: str | None = None
    iteration: int | None = None
    policy_version: str | None = None  # the new policy's version name, once done
    served: bool = False  # the server switched to it
    cancel_requested: bool = False
    resumed_from: int | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)  # set in the owning process
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)
    heartbeat_sent: float = field(default_factory=time.time, repr=False)


def _tail(path: Path, max_bytes: int = _LOG_TAIL_BYTES) -> str:
    """The end of a text file, without ANSI escapes; '' when it does not exist."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    return _ANSI.sub("", data.decode("utf-8", errors="replace")).replace("\r", "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _train_records(stage_dir: Path) -> list[dict[str, Any]]:
    """The `train` records of a running stage's metrics.jsonl; a line still being written is left out."""
    try:
        text = (stage_dir / METRICS_FILE).read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("kind") == "train":
                    records.append(record)
    return records


def _stage_training(stage_dir: Path) -> dict[str, Any]:
    """Step, total steps, ETA and a few metrics of a stage's run, from its metrics.jsonl."""
    records = _train_records(stage_dir)
    total = int(_read_json(stage_dir / "train_config.json").get("max_steps") or 0) or None
    out: dict[str, Any] = {"step": 0, "total": total, "eta_s": None, "metrics": {}}
    if not records:
        return out
    last = records[-1]
    out["step"] = int(last.get("step", 0))
    out["metrics"] = {
        k: last[k] for k in _SHOWN_METRICS if isinstance(last.get(k), int | float) and last[k] is not None
    }
    first = records[0]
    done = out["step"] - int(first.get("step", 0))
    if total and done > 0:
        per_step = (float(last["time"]) - float(first["time"])) / done
        out["eta_s"] = round(max(0.0, per_step * (total - out["step"])), 1)
    return out


def _job_of_row(row: AdminJob) -> IterationJob:
    return IterationJob(
        id=row.id,
        settings=IterationKnobs(**row.settings),
        started_by=row.started_by,
        log_path=Path(row.log_path),
        started_at=row.started_at.replace(tzinfo=datetime.UTC).timestamp(),
        status=row.status,
        finished_at=row.finished_at.replace(tzinfo=datetime.UTC).timestamp() if row.finished_at else None,
        returncode=row.returncode,
        error=row.error,
        iteration=row.iteration,
        policy_version=row.policy_version,
        served=row.served,
        cancel_requested=row.cancel_requested,
        resumed_from=row.resumed_from,
    )


class JobManager:
    """The server's iteration jobs, kept in the store: at most one runs at a time; finished ones stay
    listed, across restarts and on every server process."""

    def __init__(
        self, engine: Engine, registry: ModelRegistry, *, home: Path, work_dir: Path, grace_s: float = 60.0
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.home = home
        self.work_dir = work_dir
        self.grace_s = grace_s  # after a cancel, how long the child may take to stop before SIGKILL
        self.jobs: dict[int, IterationJob] = {}  # the jobs this process started (it owns them)
        self._lock = threading.Lock()
        atexit.register(_shutdown_at_exit, weakref.ref(self))  # weak: an app that is gone is not kept alive

    def _rows(self, *where: Any) -> list[IterationJob]:
        """Jobs from the store, newest first; a running job of a lost server is marked interrupted."""
        stale = utcnow() - datetime.timedelta(seconds=STALE_S)
        with session_scope(self.engine) as session:
            rows = list(session.scalars(select(AdminJob).where(*where).order_by(AdminJob.id.desc())))
            for row in rows:
                if row.status == "running" and row.id not in self.jobs and row.heartbeat_at < stale:
                    row.status, row.error, row.finished_at = "interrupted", INTERRUPTED, utcnow()
                    log.warning("iteration job %d lost its server: interrupted", row.id)
        return [self.jobs.get(row.id) or _job_of_row(row) for row in rows]

    def _save(self, job: IterationJob, **extra: Any) -> None:
        """Write what became of `job` (this process owns it) to its row."""
        with session_scope(self.engine) as session:
            row = session.get(AdminJob, job.id)
            if row is None:
                return
            row.status, row.returncode, row.error = job.status, job.returncode, job.error
            row.iteration, row.policy_version, row.served = job.iteration, job.policy_version, job.served
            row.finished_at = (
                datetime.datetime.fromtimestamp(job.finished_at, datetime.UTC).replace(tzinfo=None)
                if job.finished_at
                else None
            )
            row.heartbeat_at = utcnow()
            for key, value in extra.items():
                setattr(row, key, value)

    def running(self) -> IterationJob | None:
        return next(iter(self._rows(AdminJob.status == "running")), None)

    def get(self, job_id: int) -> IterationJob:
        found = self._rows(AdminJob.id == job_id)
        if not found:
            raise LookupError(f"no iteration job {job_id}")
        return found[0]

    def list(self) -> list[IterationJob]:
        """Every job, newest first."""
        return self._rows()

    def _child_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DIALOOP_HOME": str(self.home),
            "DIALOOP_DATABASE_URL": self.engine.url.render_as_string(hide_password=False),
            "PYTHONUNBUFFERED": "1",  # stage lines reach the log (and the page) as they happen
            "COLUMNS": "120",
            "NO_COLOR": "1",
        }

    async def start(
        self, iteration: IterationKnobs, started_by: str, resumed_from: int | None = None
    ) -> IterationJob:
        """Start `dialoop iterate` with these settings; JobRunning when one is running already."""
        job = await asyncio.to_thread(self._start, iteration, started_by, resumed_from)
        job.watcher = asyncio.create_task(self._watch(job), name=f"dialoop-iteration-job-{job.id}")
        return job

    def _start(self, iteration: IterationKnobs, started_by: str, resumed_from: int | None) -> IterationJob:
        with self._lock:
            if self.running() is not None:
                raise JobRunning("an iteration is running already: wait for it to end, or cancel it")
            with session_scope(self.engine) as session:
                row = AdminJob(
                    settings=dataclasses.asdict(iteration),
                    started_by=started_by,
                    log_path="",
                    host=socket.gethostname(),
                    resumed_from=resumed_from,
                )
                session.add(row)
                session.flush()
                job_id = row.id
            logs = self.home / "jobs"
            logs.mkdir(parents=True, exist_ok=True)
            log_path = logs / f"iterate-{time.strftime('%Y%m%d-%H%M%S')}-{job_id}.log"
            command = [
                sys.executable,
                "-c",
                _CLI,
                "iterate",
                f"--work-dir={self.work_dir}",
                "--no-deploy",
                *cli_args(iteration),
            ]
            with log_path.open("wb") as out:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self._child_env(),
                    start_new_session=True,  # its own process group: cancel reaches all its processes
                )
            job = IterationJob(
                job_id, iteration, started_by, log_path, process=process, resumed_from=resumed_from
            )
            self.jobs[job_id] = job
            self._save(job, log_path=str(log_path), pid=process.pid)
        log.info("iteration job %d started by %s (pid %d): %s", job_id, started_by, process.pid, log_path)
        return job

    async def resume(self, job_id: int, started_by: str) -> IterationJob:
        """Start again a job that did not finish (interrupted, cancelled, failed) with its settings: the
        iteration continues from its last checkpoint. ValueError for a running or finished job."""
        old = await asyncio.to_thread(self.get, job_id)
        if old.status in ("running", "done"):
            raise ValueError(f"iteration job {job_id} is {old.status}: there is nothing to resume")
        return await self.start(old.settings, started_by, resumed_from=job_id)

    async def _watch(self, job: IterationJob) -> None:
        assert job.process is not None
        while job.process.poll() is None:
            await asyncio.sleep(min(HEARTBEAT_S, 0.5))
            if time.time() - job.heartbeat_sent >= HEARTBEAT_S:
                job.heartbeat_sent = time.time()
                await asyncio.to_thread(self._beat, job)
        job.returncode = job.process.returncode
        if job.status == "interrupted":  # the server is stopping: shutdown() said so already
            return
        job.cancel_requested = job.cancel_requested or await asyncio.to_thread(self._cancel_asked, job.id)
        self._find_iteration(job)
        if job.returncode == 0:
            try:
                await self._finish(job)
            except Exception as exc:  # the iteration itself succeeded: say what went wrong after it
                log.exception("iteration job %d: serving the new version failed", job.id)
                job.error = f"the iteration finished, but serving its policy failed: {exc}"
            job.status = "done"
        elif job.cancel_requested:
            job.status = "cancelled"
            job.error = "cancelled: starting an iteration again continues where this one stopped"
        else:
            job.status = "failed"
            job.error = self._error_of(job)
        job.finished_at = time.time()
        await asyncio.to_thread(self._save, job)
        log.info("iteration job %d %s (exit code %s)", job.id, job.status, job.returncode)

    def _beat(self, job: IterationJob) -> None:
        with session_scope(self.engine) as session:
            row = session.get(AdminJob, job.id)
            if row is not None and row.status == "running":
                row.heartbeat_at = utcnow()

    def _cancel_asked(self, job_id: int) -> bool:
        with session_scope(self.engine) as session:
            row = session.get(AdminJob, job_id)
            return bool(row is not None and row.cancel_requested)

    async def _finish(self, job: IterationJob) -> None:
        """Record the new policy's version name and, if asked, serve it."""
        progress = self._progress_file(job)
        stages = progress.stages if progress is not None else {}
        ppo, sft = stages.get("ppo"), stages.get("sft")
        version_id = (ppo.version_id if ppo is not None else None) or (sft.version_id if sft else None)
        if version_id is None:
            return

        def name_of() -> str | None:
            with session_scope(self.engine) as session:
                version = session.get(ModelVersion, version_id)
                return version.name if version is not None else None

        job.policy_version = await asyncio.to_thread(name_of)
        if job.settings.deploy and job.policy_version is not None:
            await self.registry.set_served(job.policy_version)
            job.served = True

    def _error_of(self, job: IterationJob) -> str:
        """The CLI's error line, else the log's last line, else the exit code."""
        lines = [line.strip() for line in _tail(job.log_path).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        if errors:
            return errors[-1].removeprefix("error:").strip()
        return lines[-1] if lines else f"dialoop iterate exited with code {job.returncode}"

    def cancel(self, job_id: int) -> IterationJob:
        """Interrupt a running job (SIGINT, then SIGKILL after `grace_s`); ValueError when not running.

        A job another server process owns (on this host) gets the SIGINT too; its owner records the end."""
        job = self.get(job_id)
        if job.status != "running":
            raise ValueError(f"iteration job {job_id} is {job.status}, not running")
        job.cancel_requested = True
        with session_scope(self.engine) as session:
            row = session.get(AdminJob, job_id)
            assert row is not None
            row.cancel_requested = True
            pid, host = row.pid, row.host
        if job.process is None:
            if pid is None or host != socket.gethostname():
                raise ValueError(f"iteration job {job_id} runs on {host}: cancel it there")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGINT)
            return job
        process = job.process
        self._signal(process, signal.SIGINT)

        def kill_if_alive() -> None:
            if process.poll() is None:
                log.warning("iteration job %d ignored SIGINT for %.0f s: killing it", job.id, self.grace_s)
                self._signal(process, signal.SIGKILL)

        timer = threading.Timer(self.grace_s, kill_if_alive)
        timer.daemon = True
        timer.start()
        return job

    @staticmethod
    def _signal(process: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)

    def shutdown(self) -> None:
        """Stop running children (the server is exiting): their jobs are `interrupted`, to be resumed."""
        for job in self.jobs.values():
            if job.process is not None and job.process.poll() is None:
                job.status, job.error, job.finished_at = "interrupted", INTERRUPTED, time.time()
                with contextlib.suppress(Exception):  # the store may be gone: others will see it stale
                    self._save(job)
                self._signal(job.process, signal.SIGINT)
                try:
                    job.process.wait(timeout=self.grace_s)
                except subprocess.TimeoutExpired:
                    self._signal(job.process, signal.SIGKILL)

    # --- progress ---------------------------------------------------------------------------------

    def _find_iteration(self, job: IterationJob) -> Path | None:
        """The `iter-N` directory of the job: the newest one whose progress file it wrote."""
        if job.iteration is not None:
            return self.work_dir / f"iter-{job.iteration}"
        found: list[int] = []
        for path in self.work_dir.glob("iter-*/" + PROGRESS_FILE):
            number = path.parent.name.removeprefix("iter-")
            # the loop writes the progress file as the iteration starts: older files are other jobs'
            if number.isdigit() and path.stat().st_mtime >= job.started_at - 1:
                found.append(int(number))
        if not found:
            return None
        job.iteration = max(found)
        return self.work_dir / f"iter-{job.iteration}"

    def _progress_file(self, job: IterationJob) -> IterationProgress | None:
        folder = self._find_iteration(job)
        return IterationProgress.read(folder) if folder is not None else None

    def progress(self, job: IterationJob) -> dict[str, Any]:
        """What the page shows of a job: its status, each stage's state and training progress, the log."""
        folder = self._find_iteration(job)
        written = IterationProgress.read(folder) if folder is not None else None
        stages = []
        for name in STAGES:
            record = written.stages.get(name) if written is not None else None
            status: str = "pending" if record is None else record.status
            if status == "running" and job.status != "running":
                status = job.status  # the child stopped mid-stage: failed or cancelled
            seconds = record.seconds if record is not None and record.status != "running" else None
            note = record.note if record is not None else ""
            entry: dict[str, Any] = {"name": name, "status": status, "seconds": seconds, "note": note}
            if name != "eval" and folder is not None and status in ("running", "trained", "resumed"):
                entry.update(_stage_training(folder / name))
            stages.append(entry)
        end = job.finished_at or time.time()
        return {
            "id": job.id,
            "status": job.status,
            "started_by": job.started_by,
            "started_at": job.started_at,
            "elapsed_s": round(end - job.started_at, 1),
            "iteration": job.iteration,
            "error": job.error,
            "returncode": job.returncode,
            "policy_version": job.policy_version,
            "served": job.served,
            "resumed_from": job.resumed_from,
            "settings": dataclasses.asdict(job.settings),
            "stages": stages,
            "log_tail": "\n".join(_tail(job.log_path).splitlines()[-40:]),
        }


def _shutdown_at_exit(manager: weakref.ref[JobManager]) -> None:
    jobs = manager()
    if jobs is not None:
        jobs.shutdown()


_create_lock = threading.Lock()


def job_manager(request: Request) -> JobManager:
    """The app's job manager, made on first use with the server's store, registry and home."""
    with _create_lock:
        jobs: JobManager | None = getattr(request.app.state, "jobs", None)
        if jobs is None:
            home = Path(settings().home)
            jobs = JobManager(
                request.app.state.engine, request.app.state.registry, home=home, work_dir=home / "runs"
            )
            request.app.state.jobs = jobs
    return jobs
