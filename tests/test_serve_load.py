"""The web tier under load, over real HTTP on both stores: 200 simultaneous requests (reads and writes of
logged-in users) all answered without a 5xx, every acknowledged write found in the store afterwards; and
when every database slot is taken, a request gets 503 with Retry-After within the bounded wait."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from sqlalchemy import select
from webclient import Live, WebClient, live_web_server

from dialoop.serve.overload import DbSlots
from dialoop.store import Conversation, session_scope
from dialoop.store.accounts import create_api_key, get_user

USERS = ("alice", "bob", "tess", "root")


def _async_twin(server: Live, client: WebClient) -> httpx.AsyncClient:
    """An async client with `client`'s session cookie and CSRF token (one login, many requests)."""
    return httpx.AsyncClient(
        base_url=server.url,
        cookies=client.http.cookies,
        headers={"X-CSRF-Token": client.csrf, "Accept": "application/json"},
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        timeout=120,
    )


def _request(i: int) -> tuple[str, str, str, dict[str, Any] | None]:
    """The i-th request of the burst: (user, method, path, JSON body); half are writes."""
    user = USERS[i % len(USERS)]
    kind = i % 6
    if kind == 0:
        return user, "POST", "/api/chat/conversations", {"title": f"load {i}"}
    if kind == 1 and user in ("tess", "root"):
        return user, "POST", "/api/trainer/demonstrations", {"title": f"load {i}"}
    if kind == 1:
        return user, "POST", "/api/chat/conversations", {"title": f"load {i}", "system_prompt": "Be brief."}
    if kind == 2:
        return user, "POST", "/api/chat/conversations", {"title": f"load {i}"}
    if kind == 3:
        return user, "GET", "/api/chat/conversations", None
    if kind == 4:
        return user, "GET", "/chat", None
    return user, "GET", "/api/chat/models", None


async def _burst(server: Live, clients: dict[str, WebClient], n: int) -> list[tuple[int, dict[str, Any]]]:
    twins = {name: _async_twin(server, client) for name, client in clients.items()}
    start = asyncio.Event()

    async def one(i: int) -> tuple[int, dict[str, Any]]:
        user, method, path, body = _request(i)
        await start.wait()  # every request is in flight at once
        response = await twins[user].request(method, path, json=body)
        written = response.json() if method == "POST" and response.status_code == 201 else {}
        return response.status_code, written

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.sleep(0.1)
    start.set()
    try:
        return await asyncio.gather(*tasks)
    finally:
        for twin in twins.values():
            await twin.aclose()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_200_simultaneous_web_requests_no_5xx_and_every_acknowledged_write_kept(
    db_url: str, tiny_model_dir: Path
) -> None:
    with live_web_server(db_url, tiny_model_dir, preload=False) as server:
        clients = {name: server.client(name) for name in USERS}
        results = asyncio.run(_burst(server, clients, 200))
        statuses = Counter(status for status, _ in results)
        assert set(statuses) <= {200, 201}, statuses
        acknowledged = {w["id"]: w["title"] for _, w in results if w}
        assert len(acknowledged) == sum(1 for i in range(200) if _request(i)[1] == "POST")
        with session_scope(server.app.state.engine) as session:
            stored = dict(session.execute(select(Conversation.id, Conversation.title)).all())
        assert {i: stored.get(i) for i in acknowledged} == acknowledged


@pytest.mark.slow
def test_a_request_that_finds_no_database_slot_gets_503_with_retry_after_quickly(
    sqlite_url: str, tiny_model_dir: Path
) -> None:
    with live_web_server(
        sqlite_url, tiny_model_dir, preload=False, db_connections=2, db_wait_s=0.5
    ) as server:
        alice = server.client("alice")
        with session_scope(server.app.state.engine) as session:
            user = get_user(session, "alice")
            assert user is not None
            key = create_api_key(session, user)[1]
        slots: DbSlots = server.app.state.db_slots
        # take every slot (nothing else runs: no waiter needs waking on the server's loop)
        for _ in range(slots.size):
            slots.semaphore.acquire_nowait()
        try:
            began = time.monotonic()
            busy = alice.api("GET", "/api/chat/conversations")
            waited = time.monotonic() - began
            assert busy.status_code == 503, busy.text
            assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]
            assert 0.4 < waited < 5
            write = alice.api("POST", "/api/chat/conversations", {"title": "refused"})
            assert write.status_code == 503
            api = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert api.status_code == 503 and api.headers["retry-after"] == "1"
            assert "busy" in api.json()["error"]["message"]
        finally:
            for _ in range(slots.size):
                slots.semaphore.release()
        assert alice.api("GET", "/api/chat/conversations").json() == []
        assert alice.api("POST", "/api/chat/conversations", {"title": "kept"}).status_code == 201


def test_the_pool_the_slots_and_the_threads_are_sized_from_one_setting(
    sqlite_url: str, tiny_model_dir: Path
) -> None:
    from fastapi.testclient import TestClient

    from dialoop.serve.app import create_app
    from dialoop.settings import ServeSettings

    limits = ServeSettings(preload=False, db_connections=7, db_wait_s=2.5)
    app = create_app(database_url=sqlite_url, model=tiny_model_dir, serve_settings=limits)
    pool = app.state.engine.pool
    assert (pool.size(), pool._max_overflow, pool._timeout) == (7, 7, 2.5)
    slots: DbSlots = app.state.db_slots
    assert (slots.size, slots.wait_s, slots.threads) == (7, 2.5, 2 * 7 + 8)
    with TestClient(app) as client:
        assert client.get("/login").status_code == 200  # a route with a database session
        assert client.portal is not None
        tokens = client.portal.call(lambda: anyio.to_thread.current_default_thread_limiter().total_tokens)
    assert tokens >= slots.threads
