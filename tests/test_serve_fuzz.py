"""Property-based requests (hypothesis) over real HTTP: /v1 with the served model's name and every web JSON
route (generated from the app's routes), with arbitrary JSON, parameters in and out of range, and raw
bytes; the server never answers 5xx, and a stream never ends in a server error."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import iter_route_contexts  # type: ignore[attr-defined,unused-ignore]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from webclient import Live, WebClient, live_web_server

from dialoop.store import session_scope
from dialoop.store.accounts import create_api_key, get_user

FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
edge_ints = st.integers() | st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, -(2**63)])
edge_floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [0.0, -0.0, 1e-300, 2.0, 1e300]
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "x"]),
            "content": json_values,
        }
    )
    | json_values,
    max_size=4,
)
sampling = st.fixed_dictionaries(
    {},
    optional={
        "temperature": edge_floats,
        "top_p": edge_floats,
        "n": edge_ints,
        "max_tokens": st.integers(-2, 6) | edge_ints,
        "seed": edge_ints,
        "stop": st.text(max_size=8) | st.lists(st.text(max_size=8), max_size=6) | json_values,
        "stream": st.booleans(),
        "logprobs": st.booleans(),
        "top_logprobs": edge_ints,
        "presence_penalty": edge_floats,
        "frequency_penalty": edge_floats,
        "logit_bias": json_values,
        "user": json_values,
    },
)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    db = tmp_path_factory.mktemp("fuzz") / "store.db"
    # short generations keep a hundred examples quick
    with live_web_server(f"sqlite:///{db}", tiny_model_dir, max_tokens_limit=8, default_max_tokens=4) as live:
        yield live


@pytest.fixture(scope="module")
def v1(server: Live) -> Iterator[httpx.Client]:
    with session_scope(server.app.state.engine) as session:
        user = get_user(session, "alice")
        assert user is not None
        _, key = create_api_key(session, user)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def root(server: Live) -> WebClient:
    return server.client("root")


def assert_served(answer: httpx.Response, what: Any) -> None:
    assert answer.status_code < 500, (what, answer.status_code, answer.text[:500])
    if answer.status_code == 200 and answer.headers.get("content-type", "").startswith("text/event-stream"):
        for line in answer.text.splitlines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                event = json.loads(line[5:])
                error = event.get("error") if isinstance(event, dict) else None
                assert not (error and error.get("type") == "server_error"), (what, event)


@pytest.mark.slow
@pytest.mark.timeout(600)
@FUZZ
@given(messages=messages, params=sampling)
def test_v1_chat_completions_never_answers_5xx(
    v1: httpx.Client, messages: Any, params: dict[str, Any]
) -> None:
    body = {"model": "tiny", "messages": messages, **params}
    assert_served(v1.post("/v1/chat/completions", json=body), body)


@pytest.mark.slow
@pytest.mark.timeout(600)
@FUZZ
@given(prompt=json_values, params=sampling)
def test_v1_completions_never_answers_5xx(v1: httpx.Client, prompt: Any, params: dict[str, Any]) -> None:
    body = {"model": "tiny", "prompt": prompt, **params}
    assert_served(v1.post("/v1/completions", json=body), body)


@pytest.mark.slow
@FUZZ
@given(
    raw=st.binary(max_size=300),
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/admin/served"]),
)
def test_v1_raw_bodies_never_answer_5xx(v1: httpx.Client, raw: bytes, path: str) -> None:
    answer = v1.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert_served(answer, raw)


def web_json_routes(server: Live) -> list[tuple[str, str]]:
    """(method, path) of every web route that takes a body, from the app's routes."""
    found = []
    for route in iter_route_contexts(server.app.router.routes):
        if getattr(route, "body_field", None) is None or route.path.startswith(("/v1", "/login")):
            continue
        found += [(method, route.path) for method in sorted(route.methods or ())]
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_web_json_routes_never_answer_5xx(server: Live, root: WebClient) -> None:
    routes = web_json_routes(server)
    assert len(routes) > 15
    created = root.api("POST", "/api/chat/conversations", {"title": "fuzz"})
    demo = root.api("POST", "/api/trainer/demonstrations", {"title": "fuzz"})
    assert created.status_code == 201 and demo.status_code == 201
    ids = [created.json()["id"], demo.json()["id"], 0, -1, 2**63]

    @FUZZ
    @given(route=st.sampled_from(routes), body=json_values, ident=st.sampled_from(ids) | st.integers())
    def one(route: tuple[str, str], body: Any, ident: int) -> None:
        method, path = route
        url = re.sub(r"\{[^}]+\}", str(ident), path)
        answer = root.http.request(
            method, url, json=body, headers={"X-CSRF-Token": root.csrf, "Accept": "application/json"}
        )
        assert_served(answer, (method, url, body))

    one()
    assert root.api("GET", "/api/chat/conversations").status_code == 200
