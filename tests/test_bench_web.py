"""`dialoop bench web`: a few simulated people against `dialoop serve --workers 2`, one JSON line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dialoop.bench.web import _route_of
from dialoop.cli import app


def test_routes_are_reported_by_their_shape() -> None:
    assert _route_of("POST", "/api/trainer/tasks/17/ranking") == "POST /api/trainer/tasks/{id}/ranking"
    assert _route_of("GET", "/chat") == "GET /chat"


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_bench_web_prints_latency_per_route_and_finds_every_acknowledged_write(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'bench.db'}"
    args = ["bench", "web", "--users", "4", "--duration", "5", "--workers", "2"]
    result = CliRunner().invoke(app, [*args, "--database-url", url, "--model", str(tiny_model_dir), "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["users"] == 4 and figures["workers"] == 2 and figures["logged_in"] == 4
    assert figures["routes"]["POST /login"]["statuses"] == {"303": 4}
    assert figures["routes"]["POST /api/chat/conversations"]["requests"] > 0
    assert all(row["p95_ms"] >= row["p50_ms"] > 0 for row in figures["routes"].values())
    assert figures["writes_acknowledged"]["conversations"] > 0
    assert figures["writes_found"] == figures["writes_acknowledged"] and figures["writes_lost"] == 0
    assert figures["errors_by_status"].get("500", 0) == 0
