"""Metrics of a run: one JSON line per record in `RUN/metrics.jsonl` (always: the admin page and the report
card read it), the trackers the run's config names in `report_to` (accelerate's: TensorBoard events in
`RUN/tensorboard`, Weights & Biases, MLflow), and a rich progress bar with ETA. Everything happens on the main
process only; others get a no-op logger.

W&B and MLflow take their usual environment variables (`WANDB_MODE=offline`, `WANDB_PROJECT`,
`MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME`); a run's tracker ids are kept in `RUN/trackers.json`, so a
resumed run (and the reward model's closing evaluation) logs to the same W&B and MLflow run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dialoop.atomic import write_atomic
from dialoop.run_metrics import METRICS_FILE, read_metrics
from dialoop.train.common import CONFIG_FILE

logger = logging.getLogger(__name__)

TRACKER_IDS_FILE = "trackers.json"


def run_config(run_dir: Path) -> dict[str, Any]:
    """The config the run wrote in its dir (empty when there is none, as in a bare metrics logger)."""
    try:
        return dict(json.loads((Path(run_dir) / CONFIG_FILE).read_text()))
    except FileNotFoundError:
        return {}


def open_trackers(run_dir: Path, report_to: str, start_step: int) -> list[Any]:
    """Start accelerate's trackers named in `report_to` (comma-separated; `none`: none) for this run."""
    from accelerate import PartialState
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    PartialState()  # accelerate's trackers log through its state (a training run has it already)
    names = [n.strip() for n in report_to.split(",") if n.strip() not in ("", "none")]
    ids_path = Path(run_dir) / TRACKER_IDS_FILE
    ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    config = {k: v for k, v in run_config(run_dir).items() if isinstance(v, str | int | float | bool)}
    trackers: list[Any] = []
    for name in names:
        if name in ("wandb", "mlflow") and importlib.util.find_spec(name) is None:
            raise ValueError(f"--report-to {name} needs the {name} package: pip install 'dialoop[trackers]'")
        tracker: Any
        if name == "tensorboard":
            # purge_step drops events a killed run wrote after the checkpoint we resume from
            purge = {"purge_step": start_step + 1} if start_step else {}
            tracker = TensorBoardTracker("tensorboard", run_dir, **purge)
        elif name == "wandb":
            ids.setdefault("wandb", uuid.uuid4().hex[:16])
            tracker = WandBTracker(
                os.environ.get("WANDB_PROJECT", "dialoop"),
                name=Path(run_dir).name,
                id=ids["wandb"],
                resume="allow",
                dir=str(run_dir),
                config=config,
            )
        elif name == "mlflow":
            tracker = MLflowTracker(
                experiment_name="dialoop", run_id=ids.get("mlflow"), run_name=Path(run_dir).name
            )
        else:
            raise ValueError(f"unknown tracker {name!r}: choose from tensorboard, wandb, mlflow, none")
        tracker.start()
        if name == "mlflow" and "mlflow" not in ids:
            ids["mlflow"] = tracker.active_run.info.run_id
            tracker.store_init_configuration(config)
        trackers.append(tracker)
    if ids:
        write_atomic(ids_path, json.dumps(ids, indent=2) + "\n")
    return trackers


class MetricsLogger:
    """Writes metrics records and drives the progress bar; use as a context manager.

    `start_step` > 0 (a resumed run) drops the records the killed run wrote after its checkpoint.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        total_steps: int,
        start_step: int = 0,
        description: str = "train",
        enabled: bool = True,
        progress: bool = True,
        report_to: str | None = None,
    ) -> None:
        """`report_to`: the trackers (comma-separated); None: those of the run's config (its `report_to`,
        else TensorBoard)."""
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.total_steps = total_steps
        self._trackers: list[Any] = []
        self._progress: Progress | None = None
        self._task: Any = None
        self._file: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        if report_to is None:
            report_to = str(run_config(run_dir).get("report_to", "tensorboard"))
        self._trackers = open_trackers(Path(run_dir), report_to, start_step)
        if progress:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(stderr=True),  # stdout stays free for a command's own output
            )
            self._task = self._progress.add_task(
                description, total=total_steps, completed=start_step, status=""
            )

    def __enter__(self) -> MetricsLogger:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def log(self, step: int, metrics: Mapping[str, float | int | str | None], *, kind: str = "train") -> None:
        """Record `metrics` at `step` (JSONL line + TensorBoard scalars `kind/name`)."""
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": step, "kind": kind, "time": round(time.time(), 3)}
        for key, value in metrics.items():
            record[key] = None if isinstance(value, float) and not math.isfinite(value) else value
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {
            f"{kind}/{key}": value
            for key, value in record.items()
            if key in metrics and isinstance(value, int | float) and not isinstance(value, bool)
        }
        for tracker in self._trackers:
            tracker.log(scalars, step=step)
        if kind == "train" and self._progress is not None:
            shown = {
                k: v
                for k, v in metrics.items()
                if k in ("loss", "accuracy", "score", "kl") and isinstance(v, float)
            }
            self._progress.update(self._task, status=" ".join(f"{k} {v:.4g}" for k, v in shown.items()))

    def advance(self, step: int) -> None:
        """Move the progress bar to `step` steps done."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        for tracker in self._trackers:
            tracker.finish()
        self._trackers = []
        if self._file is not None:
            self._file.close()
            self._file = None
