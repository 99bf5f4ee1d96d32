"""Errors in OpenAI's shape for `/v1`: the error type, its handlers, unknown URLs, oversized bodies.

raise OpenAIError(404, "The model `x` does not exist.", param="model", code="model_not_found")
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from dialoop.serve.text import printable

# included after every other router, so that only URLs nobody serves reach it
fallback_router = APIRouter(prefix="/v1", include_in_schema=False)


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@fallback_router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def unknown_route(path: str, request: Request) -> None:
    """Unknown /v1 URLs (or a known URL with another method) answer in OpenAI's error shape."""
    allowed = allowed_methods(request)
    if allowed:
        raise OpenAIError(
            405,
            f"{request.method} is not allowed on /v1/{path}.",
            code="method_not_allowed",
            headers={"Allow": ", ".join(allowed)},
        )
    raise OpenAIError(404, f"Unknown request URL: {request.method} /v1/{path}.", code="unknown_url")


def _routes(app: FastAPI) -> Iterable[Any]:
    """Every route of `app`: recent FastAPI keeps included routers nested, older ones flatten them."""
    try:
        from fastapi.routing import iter_route_contexts  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return list(app.router.routes)
    return list(iter_route_contexts(app.router.routes))


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (Starlette's 405 names only the first route's)."""
    return sorted(
        {
            method
            for route in _routes(request.app)
            if route.matches(request.scope)[0] == Match.PARTIAL
            for method in getattr(route, "methods", None) or ()
        }
    )


def is_v1(request: Request) -> bool:
    return request.url.path == "/v1" or request.url.path.startswith("/v1/")


async def _openai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    """/v1 validation errors: 400 in OpenAI's shape, as OpenAI answers them; other paths: FastAPI's 422.

    Neither echoes a string it could not encode (a lone surrogate): answering it would fail in turn.
    """
    assert isinstance(exc, RequestValidationError)
    errors = printable(jsonable_encoder(exc.errors()))
    if not is_v1(request):
        return JSONResponse({"detail": errors}, status_code=422)
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return JSONResponse(
            OpenAIError(400, "The request body is not valid JSON.", code="invalid_json").body(),
            status_code=400,
        )
    locs = [[p for p in e.get("loc", ()) if p != "body"] for e in errors]
    # a union's errors come one per member type (stop.str, stop.list[str]): name their common prefix
    common: list[Any] = []
    for parts in zip(*[loc for loc in locs if loc[:1] == locs[0][:1]], strict=False):
        if len({str(p) for p in parts}) > 1:
            break
        common.append(parts[0])
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in common).lstrip(".") or None
    message = "; ".join(
        f"{'.'.join(str(p) for p in loc) or 'body'}: {e.get('msg')}"
        for loc, e in zip(locs, errors, strict=True)
    )
    return JSONResponse(
        OpenAIError(400, f"Invalid request: {message}", param=param, code="invalid_value").body(),
        status_code=400,
    )


class _BodyLimit:
    """413 for a /v1 request whose body is larger than the server's limit (checked before it is read)."""

    def __init__(self, app: ASGIApp, get_limit: Any):
        self.app = app
        self.get_limit = get_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and str(scope.get("path", "")).startswith("/v1/"):
            limit = self.get_limit()
            headers = dict(scope.get("headers", []))
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                error = OpenAIError(
                    413,
                    f"The request body is {int(length)} bytes; this server accepts at most {limit}.",
                    code="request_too_large",
                )
                await JSONResponse(error.body(), status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped errors for /v1: OpenAIError anywhere, validation errors, oversized bodies."""
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(_BodyLimit, get_limit=lambda: app.state.serve_settings.max_body_bytes)
