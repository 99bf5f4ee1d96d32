"""The metrics file of a run dir (`RUN/metrics.jsonl`, one JSON record per line): its name and its reader.

Training writes it (`dialoop.train.metrics.MetricsLogger`); the report card and the server read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of `RUN/metrics.jsonl`, optionally only those of one kind ("train", "eval", ...)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]
