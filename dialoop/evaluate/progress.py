"""One rich progress bar with ETA per stage of the loop (collection, sampling, evaluation)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Advance = Callable[[int], None]


@contextmanager
def stage_progress(description: str, total: int, *, enabled: bool = True) -> Iterator[Advance]:
    """A bar for `total` units of work; yields `advance(n)`. Disabled: a no-op with the same interface."""
    if not enabled:
        yield lambda n: None
        return
    # the same columns as the training stages' bars (dialoop.train.metrics), so a run reads as one
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    task = progress.add_task(description, total=total)
    with progress:
        yield lambda n: progress.advance(task, n)
