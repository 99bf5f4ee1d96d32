"""/metrics (Prometheus) and JSON request logs in one process; several processes: test_serve_processes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from webclient import make_web_app

from dialoop.serve.logs import JsonFormatter
from dialoop.store import session_scope
from dialoop.store.accounts import create_api_key, get_user


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    db = tmp_path_factory.mktemp("metrics") / "store.db"
    return make_web_app(f"sqlite:///{db}", tiny_model_dir, log_format="json")


def api_key(app: FastAPI, name: str) -> str:
    with session_scope(app.state.engine) as session:
        user = get_user(session, name)
        assert user is not None
        return create_api_key(session, user)[1]


def test_metrics_count_requests_by_route_template_and_need_an_admin_key(app: FastAPI) -> None:
    client = TestClient(app)
    for _ in range(3):
        assert client.get("/api/chat/conversations/12345").status_code == 401
    assert client.get("/no/such/page").status_code == 404
    assert client.get("/metrics").status_code == 401
    users_key = api_key(app, "alice")
    assert client.get("/metrics", headers={"Authorization": f"Bearer {users_key}"}).status_code == 403
    scraped = client.get("/metrics", headers={"Authorization": f"Bearer {api_key(app, 'root')}"})
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    text = scraped.text
    # the template, never the raw path (which would make one series per id)
    route = "/api/chat/conversations/{conversation_id}"
    line = f'dialoop_http_requests_total{{method="GET",route="{route}",status="401"}}'
    assert line in text and "/12345" not in text
    assert 'route="unmatched",status="404"' in text
    assert 'dialoop_http_request_duration_seconds_bucket{le="0.005",method="GET"' in text
    for name in (
        "dialoop_generation_queue_depth",
        "dialoop_generation_rows_decoding",
        "dialoop_kv_cache_slots",
        "dialoop_kv_cache_slots_used",
        "dialoop_generated_tokens_total",
    ):
        assert f"\n{name}" in text, name


def test_metrics_can_be_made_public(app: FastAPI) -> None:
    app.state.serve_settings.metrics_public = True
    try:
        assert TestClient(app).get("/metrics").status_code == 200
    finally:
        app.state.serve_settings.metrics_public = False


def test_each_request_is_one_json_log_line_with_its_request_id(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    client = TestClient(app)
    with caplog.at_level(logging.INFO, logger="dialoop.access"):
        sent = client.get("/healthz", headers={"X-Request-ID": "trace-42"})
        made = client.get("/api/chat/conversations")
        bad = client.get("/healthz", headers={"X-Request-ID": "no spaces allowed"})
    assert sent.headers["x-request-id"] == "trace-42"
    assert len(made.headers["x-request-id"]) == 32 and bad.headers["x-request-id"] != "no spaces allowed"
    records = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "dialoop.access"]
    assert [(r["method"], r["route"], r["status"], r["request_id"]) for r in records] == [
        ("GET", "/healthz", 200, "trace-42"),
        ("GET", "/api/chat/conversations", 401, made.headers["x-request-id"]),
        ("GET", "/healthz", 200, bad.headers["x-request-id"]),
    ]
    assert all(r["duration_ms"] >= 0 and r["level"] == "info" and r["ts"].endswith("Z") for r in records)
