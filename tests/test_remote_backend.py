"""`dialoop serve --inference-url`: the web tier generating on another server, here a second real
`dialoop serve` process on the tiny model (streaming, stop strings, n, refusals and cancellation pass
through)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from openai import OpenAI

from dialoop.serve.app import create_app, serve_in_background
from dialoop.serve.remote import RemoteBackend
from dialoop.settings import ServeSettings
from dialoop.store import session_scope
from dialoop.store.accounts import create_api_key, create_user
from dialoop.store.migrate import open_store

pytestmark = pytest.mark.e2e

MESSAGES: list[Any] = [{"role": "user", "content": "Name a colour."}]


@dataclass
class Tiers:
    backend_url: str
    backend_admin_key: str
    front_url: str
    front: FastAPI
    key: str

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.front_url}/v1", api_key=self.key, max_retries=0, timeout=120)

    def backend_stats(self) -> dict[str, Any]:
        response = httpx.get(
            f"{self.backend_url}/v1/admin/stats",
            headers={"Authorization": f"Bearer {self.backend_admin_key}"},
            timeout=30,
        )
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats


def _backend(model: Path, database_url: str, log: Path) -> Generator[str, None, None]:
    """`dialoop serve` in its own process, with one KV slot and room for three waiting replies."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", "from dialoop.cli import app; app()", "serve", "--model", str(model)]
    command += [
        "--port",
        str(port),
        "--database-url",
        database_url,
        "--log-level",
        "warning",
        "--threads",
        "1",
    ]
    env = {**os.environ, "DIALOOP_SERVE_MAX_BATCH": "1", "DIALOOP_SERVE_MAX_QUEUE": "3"}
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, f"the backend exited:\n{log.read_text()[-2000:]}"
            try:
                httpx.get(f"{url}/healthz", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the backend did not start"
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def tiers(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Generator[Tiers, None, None]:
    tmp = tmp_path_factory.mktemp("remote")
    backend_db = f"sqlite:///{tmp}/backend.db"
    store = open_store(backend_db)
    with session_scope(store) as session:
        _, admin_key = create_api_key(session, create_user(session, "root", "admin", "root-password"))
        _, front_key = create_api_key(session, create_user(session, "web", "user", "web-password"))
    store.dispose()
    backend = _backend(tiny_model_dir, backend_db, tmp / "backend.log")
    backend_url = next(backend)
    try:
        settings = ServeSettings(inference_url=backend_url, inference_key=front_key, preload=False)
        front = create_app(
            database_url=f"sqlite:///{tmp}/front.db", model=tiny_model_dir, serve_settings=settings
        )
        assert isinstance(front.state.worker, RemoteBackend)
        with session_scope(front.state.engine) as session:
            _, key = create_api_key(session, create_user(session, "alice", "user", "alice-password"))
        with serve_in_background(front) as front_url:
            yield Tiers(backend_url, admin_key, front_url, front, key)
    finally:
        backend.close()


def test_replies_stream_through_with_stop_strings_and_n(tiers: Tiers) -> None:
    client = tiers.client()
    full = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=20, temperature=0)
    text = full.choices[0].message.content or ""
    assert full.choices[0].finish_reason == "length" and full.usage is not None
    assert full.usage.completion_tokens == 20 and full.model == "model"
    stop = text[8:11]
    cut = client.chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=20, temperature=0, stop=stop
    )
    assert (
        cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    )

    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="default", messages=MESSAGES, max_tokens=20, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == text
    three = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=5, n=3, seed=4)
    assert [c.index for c in three.choices] == [0, 1, 2] and len(
        {c.message.content for c in three.choices}
    ) == 3
    legacy = client.completions.create(
        model="default", prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert legacy.choices[0].text and legacy.usage is not None and legacy.usage.completion_tokens == 5


def test_upstream_refusals_keep_their_status(tiers: Tiers) -> None:
    client = tiers.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as err:  # the tiny model's context is 2048 tokens
        client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=3000)
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "context_length_exceeded"


def test_a_full_upstream_queue_is_429_and_a_client_leaving_cancels_upstream(tiers: Tiers) -> None:
    client = tiers.client()
    cancelled_before = tiers.backend_stats()["cancelled"]
    running = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=1500, stream=True)
    next(c for c in running if c.choices and c.choices[0].delta.content)  # it holds the backend's one slot
    queued: list[Any] = []
    waiter = threading.Thread(
        target=lambda: queued.append(
            client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=2, n=3)
        )
    )
    waiter.start()
    deadline = time.monotonic() + 30
    while tiers.backend_stats()["queued_rows"] < 3:  # the backend's queue is full
        assert time.monotonic() < deadline, "the second request never reached the backend's queue"
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=2)
    assert int(err.value.response.headers["retry-after"]) >= 1
    running.close()  # the client goes away: the front closes its upstream stream, the backend cancels
    waiter.join(60)
    assert queued and [c.finish_reason for c in queued[0].choices] == ["length"] * 3
    deadline = time.monotonic() + 30
    while tiers.backend_stats()["cancelled"] <= cancelled_before:
        assert time.monotonic() < deadline, "the backend never cancelled the abandoned generation"
        time.sleep(0.1)
