"""Metrics of a run: one JSON line per record in `RUN/metrics.jsonl`, TensorBoard events in `RUN/tensorboard`,
and a rich progress bar with ETA. Everything happens on the main process only; others get a no-op logger.
"""

from __future__ import annotations

import json
import logging
import math
import time
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

from dialoop.run_metrics import METRICS_FILE, read_metrics

logger = logging.getLogger(__name__)


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
        tensorboard: bool = True,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.total_steps = total_steps
        self._writer: Any = None
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
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after the checkpoint we resume from
            self._writer = SummaryWriter(
                str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
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
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)
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
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None
