"""`dialoop serve` as real processes: sessions shared by two processes on one store, `--workers 2`,
SIGTERM draining a stream and losing no acknowledged write, /metrics and JSON request logs (issue #20)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_process import dialoop_serve
from sqlalchemy import select
from webclient import ACCOUNTS, PASSWORD, WebClient

from dialoop.store import session_scope
from dialoop.store.accounts import create_api_key, create_user, get_user
from dialoop.store.db import make_engine
from dialoop.store.migrate import upgrade
from dialoop.store.models import Message

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def seed_accounts(database_url: str) -> str:
    """The accounts of `webclient.ACCOUNTS`; returns an API key of the admin."""
    upgrade(database_url)
    engine = make_engine(database_url)
    with session_scope(engine) as session:
        for name, role in ACCOUNTS.items():
            create_user(session, name, role, PASSWORD)
        root = get_user(session, "root")
        assert root is not None
        _, key = create_api_key(session, root)
    engine.dispose()
    return key


def client(url: str, name: str | None = None) -> WebClient:
    web = WebClient(httpx.Client(base_url=url, timeout=120))
    if name is not None:
        assert web.login(name).status_code == 303
    return web


def test_two_processes_share_sessions_and_logouts(db_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    seed_accounts(db_url)
    with (
        dialoop_serve(db_url, tiny_model_dir, tmp_path / "a") as a,
        dialoop_serve(db_url, tiny_model_dir, tmp_path / "b") as b,
    ):
        alice = client(a.url, "alice")
        cookie = dict(alice.http.cookies)
        on_b = WebClient(httpx.Client(base_url=b.url, timeout=60, cookies=cookie))
        assert on_b.api("GET", "/api/chat/conversations").status_code == 200  # issued by A, honoured by B
        on_b.page("/chat")
        assert on_b.http.post("/logout", data={"csrf_token": on_b.csrf}).status_code == 303  # logout on B
        replay = httpx.Client(base_url=a.url, timeout=60, cookies=cookie)
        assert replay.get("/api/chat/conversations").status_code == 401  # ... is honoured by A
        # throttling counts both processes' failures: 3 on A and 2 on B stop the pair on either
        for server in (a, a, a, b, b):
            assert client(server.url).login("bob", "guess").status_code == 400
        assert client(b.url).login("bob").status_code == 429
        assert client(a.url).login("bob").status_code == 429


def test_sigterm_drains_a_stream_and_keeps_every_acknowledged_write(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    api_key = seed_accounts(url)
    with dialoop_serve(
        url, tiny_model_dir, tmp_path / "home", "--workers", "2", "--log-format", "json"
    ) as server:
        tess = client(server.url, "tess")
        created = tess.api("POST", "/api/chat/conversations", {"system_prompt": ""})
        assert created.status_code == 201
        cid = created.json()["id"]
        acknowledged = []
        for i in range(5):  # writes acknowledged before the signal
            reply = tess.api("POST", "/api/chat/conversations", {"title": f"before {i}"})
            assert reply.status_code == 201
            acknowledged.append(reply.json()["id"])

        metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {api_key}"})
        assert metrics.status_code == 200
        assert 'dialoop_http_requests_total{method="POST",route="/api/chat/conversations",status="201"}' in (
            metrics.text
        )
        assert "dialoop_kv_cache_slots" in metrics.text and "dialoop_generation_queue_depth" in metrics.text
        assert httpx.get(f"{server.url}/metrics").status_code == 401  # not without an admin's key

        events: list[dict[str, Any]] = []
        signalled_at: list[float] = []
        done_at: list[float] = []

        def stream() -> None:
            body = {
                "parent_id": None,
                "content": "Tell me a long story",
                "max_tokens": 400,
                "temperature": 1.0,
            }
            with tess.http.stream(
                "POST",
                f"/api/chat/conversations/{cid}/messages",
                json=body,
                headers={"X-CSRF-Token": tess.csrf},
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[5:]))
                        if events[-1]["type"] == "start":
                            server.process.send_signal(signal.SIGTERM)  # mid-stream
                            signalled_at.append(time.monotonic())
            done_at.append(time.monotonic())

        reader = threading.Thread(target=stream)
        reader.start()
        reader.join(timeout=300)
        assert signalled_at, f"the stream never started: {events}"
        assert events[-1]["type"] == "done", events[-3:]  # the stream in flight was let finish
        assert done_at[0] > signalled_at[0]
        with pytest.raises(httpx.TransportError):  # while no new connection is taken
            for _ in range(50):
                httpx.get(f"{server.url}/healthz", timeout=2)
                time.sleep(0.1)
        assert server.process.wait(timeout=120) == 0
        reply_id = events[-1]["message"]["id"]

    engine = make_engine(url)
    with session_scope(engine) as session:
        from dialoop.store.models import Conversation

        found = set(session.scalars(select(Conversation.id).where(Conversation.id.in_(acknowledged))))
        assert found == set(acknowledged)
        assert session.get(Message, reply_id) is not None  # the drained stream's reply was saved
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "dialoop.access"]
    assert any(
        r["route"] == "/api/chat/conversations" and r["status"] == 201 and r["method"] == "POST"
        for r in access
    )
    assert all({"request_id", "duration_ms", "route", "status", "method"} <= set(r) for r in access)
