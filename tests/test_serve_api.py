"""The /v1 API over HTTP: API-key auth on both stores, OpenAI-shaped errors, limits, the SSE wire format,
and cancellation when a client disconnects."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dialoop.serve.app import create_app, serve_in_background
from dialoop.serve.worker import GenerationWorker
from dialoop.settings import ServeSettings
from dialoop.store import session_scope
from dialoop.store.accounts import create_api_key, create_user, revoke_api_key

HELLO = [{"role": "user", "content": "Hello"}]
LIMITS = ServeSettings(
    max_messages=4,
    max_message_chars=4000,
    max_tokens_limit=1500,
    max_n=3,
    max_stop=2,
    max_body_bytes=20_000,
)


@dataclass
class Live:
    url: str
    app: FastAPI
    http: httpx.Client  # authenticated as a plain user

    @property
    def worker(self) -> GenerationWorker:
        worker: GenerationWorker = self.app.state.worker
        return worker

    def chat(self, **body: Any) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json={"model": "tiny", "messages": HELLO, **body})


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    db = tmp_path_factory.mktemp("serve-api") / "store.db"
    app = create_app(
        database_url=f"sqlite:///{db}", model=tiny_model_dir, model_name="tiny", serve_settings=LIMITS
    )
    with session_scope(app.state.engine) as session:
        _, key = create_api_key(session, create_user(session, "alice", "user", "alice-password"))
    with (
        serve_in_background(app) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http,
    ):
        yield Live(url, app, http)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI-shaped error of `response`, checking its status and its four fields."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def wait_for(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_api_keys_and_roles_are_checked_on_both_stores(db_url: str, tiny_model_dir: Path) -> None:
    app = create_app(database_url=db_url, model=tiny_model_dir, serve_settings=ServeSettings(preload=False))
    with session_scope(app.state.engine) as session:
        _, admin_key = create_api_key(session, create_user(session, "root", "admin", "root-password"))
        user = create_user(session, "bob", "user", "bob-password")
        _, user_key = create_api_key(session, user)
        revoked, revoked_key = create_api_key(session, user)
        revoke_api_key(session, revoked.id)
    with TestClient(app) as client:
        missing = error_of(client.get("/v1/models"), 401)
        assert "API key" in missing["message"]
        for bad in ("Bearer dl-wrong", f"Bearer {revoked_key}", f"Basic {user_key}"):
            error_of(client.get("/v1/models", headers={"Authorization": bad}), 401)
        assert error_of(client.get("/v1/models", headers={"Authorization": "Bearer dl-x"}), 401)["code"] == (
            "invalid_api_key"
        )
        as_user = {"Authorization": f"Bearer {user_key}"}
        assert client.get("/v1/models", headers=as_user).status_code == 200
        assert error_of(client.get("/v1/admin/stats", headers=as_user), 403)["type"] == "permission_error"
        stats = client.get("/v1/admin/stats", headers={"Authorization": f"Bearer {admin_key}"})
        assert stats.status_code == 200 and stats.json()["served"] == tiny_model_dir.name


def test_invalid_parameters_are_400_naming_the_parameter(live: Live) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        ({"stop": 5}, "stop"),
    ]
    for body, param in cases:
        error = error_of(live.chat(**body), 400)
        assert error["param"] == param, (body, error)
        assert error["type"] == "invalid_request_error"
    error_of(live.http.post("/v1/chat/completions", json={"messages": HELLO}), 400)


def test_a_body_that_is_not_json_is_400(live: Live) -> None:
    response = live.http.post(
        "/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    assert error_of(response, 400)["code"] == "invalid_json"


def test_size_limits_answer_413_and_limits_on_parameters_400(live: Live) -> None:
    too_many = error_of(live.chat(messages=HELLO * 5), 413)
    assert too_many["code"] == "too_many_messages" and "at most 4" in too_many["message"]
    too_long = error_of(live.chat(messages=[{"role": "user", "content": "x" * 4001}]), 413)
    assert too_long["code"] == "message_too_long" and too_long["param"] == "messages[0].content"
    huge = error_of(live.chat(messages=[{"role": "user", "content": "x" * 30_000}]), 413)
    assert huge["code"] == "request_too_large"
    for body, param in (
        ({"max_tokens": 1501}, "max_tokens"),
        ({"max_completion_tokens": 1501}, "max_completion_tokens"),
        ({"n": 4}, "n"),
        ({"stop": ["a", "b", "c"]}, "stop"),
    ):
        error = error_of(live.chat(**body), 400)
        assert error["param"] == param and "at most" in error["message"].lower()


def test_a_prompt_that_leaves_no_room_is_400_context_length_exceeded(live: Live) -> None:
    long_message = [{"role": "user", "content": " x" * 1000}]  # about 1000 tokens; the context is 2048
    error = error_of(live.chat(messages=long_message, max_tokens=1500), 400)
    assert error["code"] == "context_length_exceeded" and "context" in error["message"]
    assert live.chat(messages=long_message, max_tokens=4).status_code == 200


def test_text_content_parts_are_read_and_other_parts_refused(live: Live) -> None:
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    reply = live.chat(messages=[{"role": "user", "content": parts}], max_tokens=2)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
    image = [{"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]
    error = error_of(live.chat(messages=[{"role": "user", "content": image}]), 400)
    assert error["code"] == "unsupported_content" and error["param"] == "messages[0].content"


def test_unknown_urls_are_404_and_wrong_methods_405_in_openai_shape(live: Live) -> None:
    assert error_of(live.http.get("/v1/embeddings"), 404)["code"] == "unknown_url"
    assert error_of(live.http.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"


def sse_events(response: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of a server-sent event stream."""
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: "), line
            yield line[len("data: ") :]


def test_the_stream_is_server_sent_events_ending_with_done(live: Live) -> None:
    with live.http.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "tiny", "messages": HELLO, "max_tokens": 4, "stream": True},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in chunks[-1]  # only with stream_options.include_usage


def test_a_generation_cancelled_mid_stream_sends_an_error_event(live: Live) -> None:
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 1500, "stream": True}
    with live.http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = sse_events(response)
        for event in events:
            chunk = json.loads(event)
            if chunk["choices"][0]["delta"].get("content"):
                break
        assert live.worker.cancel(chunk["id"].removeprefix("chatcmpl-"))  # e.g. an admin stops it
        rest = list(events)
    assert rest[-1] == "[DONE]"
    errors = [json.loads(e)["error"] for e in rest[:-1] if "error" in json.loads(e)]
    assert len(errors) == 1 and errors[0]["code"] == "cancelled" and errors[0]["type"] == "server_error"


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(live: Live) -> None:
    stats = live.worker.stats
    cancelled, tokens = stats.cancelled, stats.tokens_generated
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 1500, "stream": True}
    with live.http.stream("POST", "/v1/chat/completions", json=body) as response:
        seen = 0
        for event in sse_events(response):
            seen += bool(json.loads(event)["choices"][0]["delta"].get("content"))
            if seen == 3:
                break
    wait_for(lambda: stats.cancelled == cancelled + 1, "the server to cancel the generation")
    assert stats.tokens_generated - tokens < 1500


def test_a_client_that_gives_up_on_a_non_stream_reply_cancels_it(live: Live) -> None:
    stats = live.worker.stats
    cancelled, tokens = stats.cancelled, stats.tokens_generated
    with pytest.raises(httpx.ReadTimeout):
        live.http.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 1500}, timeout=1.0
        )
    wait_for(lambda: stats.cancelled == cancelled + 1, "the server to cancel the generation")
    assert stats.tokens_generated - tokens < 1500


def test_an_empty_store_says_how_to_create_the_first_admin(
    sqlite_url: str, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(
        database_url=sqlite_url, model=tiny_model_dir, serve_settings=ServeSettings(preload=False)
    )
    with caplog.at_level(logging.WARNING, logger="dialoop.serve.app"), TestClient(app):
        pass
    assert "dialoop users add NAME --role admin" in caplog.text
    with session_scope(app.state.engine) as session:
        create_user(session, "root", "admin", "root-password")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dialoop.serve.app"), TestClient(app):
        pass
    assert "users add" not in caplog.text


@pytest.mark.e2e
def test_the_serving_benchmark_runs_end_to_end(tiny_model_dir: Path) -> None:
    """`dialoop bench serve` starts `dialoop serve` in a subprocess: this also covers the CLI."""
    from dialoop.bench.serve import bench_serve

    result = bench_serve(
        tiny_model_dir, concurrency=(1, 2), rounds=1, max_tokens=400, threads=1, arrival_s=0.05
    )
    one, two = result["levels"]
    assert (one["concurrency"], one["requests"], two["requests"]) == (1, 1, 2)
    # the second stream, arriving while the first decodes, joins its batch
    assert max(two["batch_sizes"]) == 2 and set(two["batch_sizes"]) <= {1, 2}
    assert 0 < one["completion_tokens"] <= 400 and one["tokens_per_s"] > 0
    assert 0 < two["ttft_p50_ms"] <= two["ttft_p95_ms"]
    assert result["speedup_at"] == 2 and isinstance(result["meets_target"], bool)
    assert result["ttft_p95_over_one_stream"] > 0 and result["arrival_s"] == 0.05
