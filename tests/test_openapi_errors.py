"""The OpenAPI schema lists every error status each route can answer: walking `app.openapi()`, each operation
has the statuses its dependencies imply (an API key -> 401, an admin's key -> 403, a body -> 413 and
400 on /v1, generation -> 429/503, the database -> 503, a path parameter -> 404), in the route family's
error shape; and the statuses the server really answers are among them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dialoop.serve.app import create_app
from dialoop.settings import ServeSettings
from dialoop.store import session_scope
from dialoop.store.accounts import create_api_key, create_user


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    db = tmp_path_factory.mktemp("openapi") / "store.db"
    return create_app(
        database_url=f"sqlite:///{db}",
        model=tiny_model_dir,
        model_name="tiny",
        serve_settings=ServeSettings(preload=False),
    )


def operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def dependency_names(app: FastAPI, method: str, path: str) -> set[str]:
    from fastapi.routing import iter_route_contexts  # type: ignore[attr-defined,unused-ignore]

    def walk(dependant: Any) -> Iterator[str]:
        for sub in dependant.dependencies:
            yield getattr(sub.call, "__name__", "")
            yield from walk(sub)

    for route in iter_route_contexts(app.router.routes):
        if getattr(route, "path_format", None) == path and method in (route.methods or ()):
            names = set(walk(route.dependant))
            if route.body_field is not None:
                names.add("<body>")
            if route.dependant.path_params:
                names.add("<path>")
            return names
    raise AssertionError(f"no route for {method} {path}")


def test_every_operation_lists_the_error_statuses_its_dependencies_imply(app: FastAPI) -> None:
    schema = app.openapi()
    seen = 0
    for method, path, operation in operations(schema):
        seen += 1
        deps = dependency_names(app, method, path)
        v1 = path.startswith("/v1")
        expected = {400 if v1 else 422}
        if "api_user" in deps:
            expected |= {401, 503}
        if "api_admin" in deps:
            expected |= {403}
        if "<body>" in deps:
            expected |= {413}
        if "get_worker" in deps:
            expected |= {404, 429, 503}
        if "<path>" in deps or "get_registry" in deps:
            expected |= {404}
        documented = {int(s) for s in operation["responses"] if s.isdigit() and int(s) >= 400}
        assert expected <= documented, (method, path, sorted(expected - documented))
        if v1:
            assert 422 not in documented, (method, path)  # /v1 answers validation errors 400
        for status in documented:
            ref = operation["responses"][str(status)]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("OpenAIErrorResponse" if v1 else ("ErrorResponse", "HTTPValidationError")), (
                ref
            )
    assert seen >= 5
    completions = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "429", "503"} <= set(completions)
    assert "403" in schema["paths"]["/v1/admin/served"]["post"]["responses"]
    error = schema["components"]["schemas"]["OpenAIErrorResponse"]
    assert error["properties"]["error"]["required"] == ["message", "type", "param", "code"]


def test_the_statuses_the_api_answers_are_documented(app: FastAPI) -> None:
    """Each status the server really answers, provoked route by route, is listed for that operation."""
    with session_scope(app.state.engine) as session:
        _, user_key = create_api_key(session, create_user(session, "doc-user", "user", "pw-doc-user"))
    schema = app.openapi()
    documented = {(m, p): {int(s) for s in op["responses"]} for m, p, op in operations(schema)}
    user = {"Authorization": f"Bearer {user_key}"}
    calls: list[tuple[str, str, str, dict[str, str], Any]] = [
        ("POST", "/v1/chat/completions", "/v1/chat/completions", {}, {"model": "tiny", "messages": []}),
        ("POST", "/v1/chat/completions", "/v1/chat/completions", user, {"model": "tiny", "messages": 3}),
        (
            "POST",
            "/v1/chat/completions",
            "/v1/chat/completions",
            user,
            {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
        ),
        ("POST", "/v1/chat/completions", "/v1/chat/completions", user, "x" * 3_000_000),
        ("GET", "/v1/models", "/v1/models", {}, None),
        ("GET", "/v1/models/{name}", "/v1/models/nope", user, None),
        ("POST", "/v1/admin/served", "/v1/admin/served", user, {"model": "tiny"}),
        ("GET", "/v1/admin/stats", "/v1/admin/stats", user, None),
    ]
    with TestClient(app) as client:
        for method, operation, url, headers, body in calls:
            content = body if isinstance(body, str) else None
            json_body = None if isinstance(body, str) else body
            answer: httpx.Response = client.request(
                method, url, headers=headers, json=json_body, content=content
            )
            assert answer.status_code >= 400, (url, answer.text)
            assert answer.status_code in documented[(method, operation)], (method, url, answer.status_code)
