"""`dialoop serve` killed with SIGKILL under concurrent writes, then started again: every write the server
acknowledged (201 with the new row's id) is in the store and served, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from webclient import ACCOUNTS, PASSWORD, WebClient

from dialoop.store import Conversation, session_scope
from dialoop.store.accounts import create_user
from dialoop.store.db import make_engine
from dialoop.store.migrate import upgrade

WRITERS = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def dialoop_serve(db_url: str, model: Path, home: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`dialoop serve` in its own process, once it answers /healthz."""
    env = {
        **os.environ,
        "DIALOOP_HOME": str(home),
        "DIALOOP_SECRET_KEY": "kill-test-key",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "dialoop.cli", "--database-url", db_url, "serve"]
    command += ["--model", str(model), "--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (server.stderr.read() if server.stderr else b"").decode()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start in 120 s"
            time.sleep(0.2)
        yield server
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=30)


def login(url: str, name: str) -> WebClient:
    client = WebClient(httpx.Client(base_url=url, timeout=30))
    assert client.login(name).status_code == 303
    return client


def write_until_stopped(
    client: WebClient, tag: str, stop: threading.Event, acknowledged: dict[int, str]
) -> None:
    i = 0
    while not stop.is_set():
        title = f"{tag} {i}"
        i += 1
        try:
            answer = client.api("POST", "/api/chat/conversations", {"title": title})
        except httpx.TransportError:
            return  # the server is gone: this write was never acknowledged
        if answer.status_code == 201:
            acknowledged[answer.json()["id"]] = title


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_under_concurrent_writes_loses_no_acknowledged_write(
    db_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    with session_scope(engine) as session:
        for name, role in ACCOUNTS.items():
            create_user(session, name, role, PASSWORD)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    acknowledged: dict[int, str] = {}
    with dialoop_serve(db_url, tiny_model_dir, tmp_path / "home", port) as server:
        clients = [login(url, name) for name in ("alice", "bob", "tess", "root")]
        stop = threading.Event()
        writers = [
            threading.Thread(
                target=write_until_stopped, args=(clients[i % len(clients)], f"w{i}", stop, acknowledged)
            )
            for i in range(WRITERS)
        ]
        for writer in writers:
            writer.start()
        while len(acknowledged) < 200:  # well into the writing
            time.sleep(0.05)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        stop.set()
        for writer in writers:
            writer.join(timeout=60)
    assert len(acknowledged) >= 200
    with session_scope(engine) as session:
        stored = dict(session.execute(select(Conversation.id, Conversation.title)).all())
    assert {i: stored.get(i) for i in acknowledged} == acknowledged
    # started again on the same store, it serves them
    with dialoop_serve(db_url, tiny_model_dir, tmp_path / "home", port):
        alice = login(url, "alice")
        mine = {c["id"]: c["title"] for c in alice.api("GET", "/api/chat/conversations").json()}
        alices = {i: t for i, t in acknowledged.items() if t.split()[0] in ("w0", "w4", "w8", "w12")}
        assert alices and {i: mine.get(i) for i in alices} == alices
    engine.dispose()
