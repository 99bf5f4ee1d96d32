"""A production server's basics, over real HTTP with a tiny model: a request the sampler cannot serve fails
alone, generation parameters are checked at the edge, text the store cannot hold is refused the same way
on SQLite and PostgreSQL, liveness and readiness probes, and `Allow` on every 405."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletion
from sqlalchemy import create_engine, func, select
from webclient import live_web_server

from dialoop.serve.app import create_app, serve_in_background
from dialoop.serve.worker import GenerationWorker
from dialoop.settings import ServeSettings
from dialoop.store import Conversation, session_scope
from dialoop.store.accounts import create_api_key, create_user

HELLO = [{"role": "user", "content": "Hello"}]
SURROGATE_JSON = b'{"model": "tiny", "messages": [{"role": "user", "content": "bad \\ud800 text"}]}'


@dataclass
class Live:
    url: str
    app: FastAPI
    key: str
    http: httpx.Client  # authenticated with `key`

    @property
    def worker(self) -> GenerationWorker:
        worker: GenerationWorker = self.app.state.worker
        return worker

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    db = tmp_path_factory.mktemp("hardening") / "store.db"
    # a long batching window, so that the concurrent requests of a test land in one batch
    settings = ServeSettings(batch_window_ms=300, max_batch=32, max_queue=64, max_n=4)
    app = create_app(
        database_url=f"sqlite:///{db}", model=tiny_model_dir, model_name="tiny", serve_settings=settings
    )
    with session_scope(app.state.engine) as session:
        _, key = create_api_key(session, create_user(session, "alice", "user", "alice-password"))
    with (
        serve_in_background(app) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http,
    ):
        yield Live(url, app, key, http)


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# --- one request cannot fail everyone's ---------------------------------------------------------------


def test_a_seed_past_64_bits_is_refused_alone_while_a_batch_decodes(live: Live) -> None:
    """A seed past 64 bits, slipped in behind the API's validation, is refused at submission; the
    requests decoding meanwhile all complete and the server still serves."""
    loop = live.worker._loop  # the server's event loop

    async def bad_row() -> str:
        while not live.worker.metrics()["rows_running"]:  # arrive while the others decode
            await asyncio.sleep(0.001)
        try:
            await live.worker.submit(HELLO, max_tokens=4, seed=2**64)  # type: ignore[arg-type]
        except ValueError as exc:
            return str(exc)
        return "accepted"

    async def nineteen() -> list[Any]:
        client = AsyncOpenAI(base_url=f"{live.url}/v1", api_key=live.key, max_retries=0, timeout=120)
        return await asyncio.gather(
            *(
                client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, seed=i)  # type: ignore[arg-type]
                for i in range(19)
            )
        )

    bad = asyncio.run_coroutine_threadsafe(bad_row(), loop)
    replies = asyncio.run(nineteen())
    assert "seed" in bad.result(timeout=120)
    assert [r.choices[0].finish_reason for r in replies] == ["length"] * 19
    assert all(r.usage is not None and r.usage.completion_tokens == 4 for r in replies)
    assert live.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)  # type: ignore[arg-type]


def test_v1_parameters_outside_the_samplers_range_are_400_in_openai_shape(live: Live) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -1}, "seed"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ]
    for params, param in cases:
        body = {"model": "tiny", "messages": HELLO, **params}
        error = openai_error(live.http.post("/v1/chat/completions", json=body), 400)
        assert error["param"] == param and error["type"] == "invalid_request_error", (params, error)
    with pytest.raises(openai.BadRequestError) as raised:
        live.client().chat.completions.create(model="tiny", messages=HELLO, seed=2**64)  # type: ignore[arg-type]
    assert raised.value.status_code == 400
    reply = live.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, seed=2**63 - 1)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.slow
def test_web_generation_options_outside_the_samplers_range_are_422(
    tiny_model_dir: Path, sqlite_url: str
) -> None:
    with live_web_server(sqlite_url, tiny_model_dir) as server:
        alice = server.client("alice")
        created = alice.api("POST", "/api/chat/conversations", {"title": "t"})
        assert created.status_code == 201, created.text
        messages = f"/api/chat/conversations/{created.json()['id']}/messages"
        for options in ({"temperature": 3}, {"top_p": 0}, {"top_p": 1.5}, {"max_tokens": 0}):
            answer = alice.api("POST", messages, {"content": "Hi", **options})
            assert answer.status_code == 422, (options, answer.text)
        tess = server.client("tess")
        demo = tess.api("POST", "/api/trainer/demonstrations", {"title": "d"})
        assert demo.status_code == 201, demo.text
        suggest = f"/api/trainer/demonstrations/{demo.json()['id']}/suggestions"
        for options in ({"seed": 2**64}, {"seed": -1}, {"n": 0}, {"temperature": 9}, {"top_p": 0}):
            answer = tess.api("POST", suggest, options)
            assert answer.status_code == 422, (options, answer.text)
            assert [e["loc"][-1] for e in answer.json()["detail"]] == list(options)


# --- text the store cannot hold ---------------------------------------------------------------------


@pytest.mark.slow
def test_nul_and_lone_surrogates_are_refused_alike_on_both_stores(db_url: str, tiny_model_dir: Path) -> None:
    with live_web_server(db_url, tiny_model_dir) as server:
        alice = server.client("alice")
        for title in ("nul \x00 byte", "ok"):
            for field in ("title", "system_prompt"):
                body = {"title": "ok", field: title}
                answer = alice.api("POST", "/api/chat/conversations", body)
                if title == "ok":
                    assert answer.status_code == 201, answer.text
                    continue
                assert answer.status_code == 422, answer.text
                (error,) = answer.json()["detail"]
                assert error["loc"] == ["body", field] and "NUL" in error["msg"]
        # a lone surrogate (only JSON's escape can carry one), then the same connection serves on
        raw = alice.http.post(
            "/api/chat/conversations",
            content=b'{"title": "bad \\udc00 title"}',
            headers={"Content-Type": "application/json", "X-CSRF-Token": alice.csrf},
        )
        assert raw.status_code == 422 and "surrogate" in raw.json()["detail"][0]["msg"]
        listed = alice.api("GET", "/api/chat/conversations")
        assert listed.status_code == 200
        # forms and query strings too
        login = httpx.post(f"{server.url}/login", data={"name": "a\x00b", "password": "x"})
        assert login.status_code == 422 and login.json()["detail"][0]["loc"] == ["body", "name"]
        query = alice.http.get("/api/chat/conversations", params={"q": "x\x00"})
        assert query.status_code == 422 and query.json()["detail"][0]["loc"] == ["query", "q"]
        tess = server.client("tess")
        demo = tess.api("POST", "/api/trainer/demonstrations", {"title": "d", "system_prompt": "\x00"})
        assert demo.status_code == 422
        with session_scope(server.app.state.engine) as session:
            titles = session.scalars(select(Conversation.title)).all()
            assert sorted(titles) == ["ok", "ok"]
            assert session.scalar(select(func.count()).select_from(Conversation)) == 2


@pytest.mark.slow
def test_integers_past_64_bits_are_refused_alike_on_both_stores(db_url: str, tiny_model_dir: Path) -> None:
    """Found by tests/test_serve_fuzz.py: a path id of 2**63 was a 500 (SQLite OverflowError)."""
    with live_web_server(db_url, tiny_model_dir, preload=False) as server:
        alice = server.client("alice")
        created = alice.api("POST", "/api/chat/conversations", {"title": "t"})
        assert created.status_code == 201
        for method, path, body in [
            ("GET", f"/api/chat/conversations/{2**63}", None),
            ("PATCH", f"/api/chat/conversations/{2**63}", {}),
            ("DELETE", f"/api/chat/conversations/{-(2**63) - 1}", None),
            (
                "POST",
                f"/api/chat/conversations/{created.json()['id']}/messages/1/preference",
                {"other_id": 2**64},
            ),
        ]:
            answer = alice.api(method, path, body)
            assert answer.status_code == 422, (method, path, answer.text)
            assert answer.json()["detail"][0]["msg"].startswith("integer out of range")
        assert alice.api("GET", f"/api/chat/conversations/{2**31}").status_code == 422  # ids: 32 bits
        # the largest id is only missing
        assert alice.api("GET", f"/api/chat/conversations/{2**31 - 1}").status_code == 404
        # an id of a body past 32 bits: not found on SQLite, past the column's range on PostgreSQL
        path = f"/api/chat/conversations/{created.json()['id']}/messages/1/preference"
        assert alice.api("POST", path, {"other_id": 2**40}).status_code in (404, 422)


def test_v1_refuses_nul_surrogates_and_non_utf8_with_400_in_openai_shape(live: Live) -> None:
    headers = {"Content-Type": "application/json"}
    surrogate = openai_error(
        live.http.post("/v1/chat/completions", content=SURROGATE_JSON, headers=headers), 400
    )
    assert surrogate["param"] == "messages[0].content" and "surrogate" in surrogate["message"]
    nul = {"model": "tiny", "messages": [{"role": "user", "content": "a\x00b"}]}
    assert (
        openai_error(live.http.post("/v1/chat/completions", json=nul), 400)["param"] == "messages[0].content"
    )
    stop = {"model": "tiny", "messages": HELLO, "stop": ["\x00"]}
    assert openai_error(live.http.post("/v1/chat/completions", json=stop), 400)["param"] == "stop[0]"
    latin1 = '{"model": "tiny", "messages": [{"role": "user", "content": "caf\xe9"}]}'.encode("latin-1")
    openai_error(live.http.post("/v1/chat/completions", content=latin1, headers=headers), 400)
    # the client cannot encode a lone surrogate itself (JavaScript clients send it as this escape):
    # its raw-body call carries it, through the client's own error handling
    with pytest.raises(openai.BadRequestError) as raised:
        live.client().post(
            "/chat/completions",
            content=SURROGATE_JSON,
            cast_to=ChatCompletion,
            options={"headers": {"Content-Type": "application/json"}},
        )
    assert raised.value.status_code == 400
    # the connection and the server still serve
    assert (
        live.http.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 1}
        ).status_code
        == 200
    )


# --- operations basics ------------------------------------------------------------------------------


def test_healthz_and_readyz(tiny_model_dir: Path, sqlite_url: str, tmp_path: Path) -> None:
    app = create_app(
        database_url=sqlite_url, model=tiny_model_dir, serve_settings=ServeSettings(preload=False)
    )
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        waiting = client.get("/readyz")
        assert waiting.status_code == 503 and "not loaded" in waiting.json()["reason"]
        # what the first request (or preload) does: load the served model
        assert client.portal is not None
        app.state.registry.release(client.portal.call(app.state.registry.acquire, None))
        assert client.get("/readyz").status_code == 200
        store = app.state.engine
        app.state.engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'store.db'}")
        try:
            down = client.get("/readyz")
            assert down.status_code == 503 and "store" in down.json()["reason"]
            assert client.get("/healthz").status_code == 200
        finally:
            app.state.engine.dispose()
            app.state.engine = store
        assert client.get("/readyz").status_code == 200


def test_405_names_every_method_of_the_path(live: Live) -> None:
    conversations = live.http.delete("/api/chat/conversations")
    assert conversations.status_code == 405 and conversations.headers["allow"] == "GET, POST"
    health = live.http.post("/healthz")
    assert health.status_code == 405 and health.headers["allow"] == "GET"
    models = live.http.post("/v1/models")
    assert openai_error(models, 405)["code"] == "method_not_allowed"
    assert models.headers["allow"] == "GET"
