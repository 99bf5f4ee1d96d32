"""The error statuses of every route in the OpenAPI schema (`/openapi.json`, `/docs`), from its dependencies.

FastAPI documents a route's success and its 422; the other refusals come from dependencies shared by many
routes, so they are documented from the same place: each dependency below names the statuses it can
answer, and `install_error_docs` adds them to every operation that uses it, in the route family's error
shape (OpenAI's on `/v1`, where a validation error is 400, never 422; `{"detail": ...}` elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from dialoop.serve.auth import current_user
from dialoop.serve.deps import api_admin, api_user, get_registry, get_session, get_worker

INVALID = (
    "Invalid request: a parameter out of range or of the wrong type, text with NUL or unpaired surrogates"
)
DESCRIPTIONS = {
    400: INVALID + ", a body that is not JSON",
    401: "No valid credentials: an API key (`Authorization: Bearer`) on /v1, a login elsewhere",
    403: "The caller's role may not do this (or, on the web routes, the CSRF token is missing)",
    404: "No such model or object, or not the caller's",
    413: "The request body is larger than the route accepts (counted on the bytes received), or the prompt "
    "is longer than the model's context (400 on /v1)",
    422: INVALID,
    429: "Too many requests waiting for generation: retry later",
    503: "The server is busy (no database slot freed in time) or not ready: retry after `Retry-After`",
}
# what each dependency can answer, besides the route's own validation error
DEPENDENCY_STATUSES: dict[Callable[..., Any], tuple[int, ...]] = {
    api_user: (401, 503),
    api_admin: (403,),
    current_user: (401,),
    get_session: (503,),
    get_registry: (404,),
    get_worker: (
        404,
        413,
        429,
        503,
    ),  # the REFUSALS of dialoop.serve.generation: unknown model, too long, queue full
}
ROLE_CHECK = "has_role"  # the dependency `dialoop.serve.auth.require_role` makes: 403

OPENAI_ERROR = "OpenAIErrorResponse"
WEB_ERROR = "ErrorResponse"
SCHEMAS = {
    OPENAI_ERROR: {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    WEB_ERROR: {"type": "object", "required": ["detail"], "properties": {"detail": {}}},
}


def _calls(dependant: Any) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


def error_statuses(route: APIRoute) -> set[int]:
    """Every error status `route` can answer, from its parameters and dependencies."""
    v1 = route.path.startswith("/v1")
    found = {400 if v1 else 422}  # every route checks its parameters and text (dialoop.serve.text)
    if route.body_field is not None:
        found.add(413)
    if route.dependant.path_params:
        found.add(404)
    for call in _calls(route.dependant):
        found.update(DEPENDENCY_STATUSES.get(call, ()))
        if getattr(call, "__name__", "") == ROLE_CHECK:
            found.update((401, 403))
    return found


def _routes(app: FastAPI) -> Iterator[APIRoute]:
    try:
        from fastapi.routing import iter_route_contexts  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        routes: list[Any] = list(app.router.routes)
    else:
        routes = list(iter_route_contexts(app.router.routes))
    for route in routes:
        if getattr(route, "dependant", None) is not None and getattr(route, "include_in_schema", False):
            yield route


def add_error_statuses(app: FastAPI, schema: dict[str, Any]) -> None:
    """Add each operation's error statuses to `schema` (FastAPI's OpenAPI dict), in place."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(SCHEMAS)
    for route in _routes(app):
        v1 = route.path.startswith("/v1")
        shape = {"$ref": f"#/components/schemas/{OPENAI_ERROR if v1 else WEB_ERROR}"}
        path = schema["paths"].get(route.path_format, {})
        for method in route.methods or ():
            operation = path.get(method.lower())
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            if v1:
                responses.pop("422", None)  # /v1 answers validation errors 400, as OpenAI does
            for status in sorted(error_statuses(route)):
                documented = responses.setdefault(str(status), {"description": DESCRIPTIONS[status]})
                documented.setdefault("content", {"application/json": {"schema": shape}})


def install_error_docs(app: FastAPI) -> None:
    """Make `app.openapi()` list every operation's error statuses (see the module's doc)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            add_error_statuses(app, build())
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
