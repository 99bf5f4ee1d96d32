"""Request body limits, counted on the bytes received (chunked bodies included), with a clear 413.

FastAPI counts them: `FastAPI(max_body_size=...)` for every route, `include_router(..., max_body_size=...)`
and `@router.post(..., max_body_size=...)` for a router or a route (the most specific wins). A
`Content-Length` above the limit is refused before any byte is read; a body without one (chunked) is
refused as soon as the bytes received pass the limit, so nothing larger is ever held in memory.

The limits (`ServeSettings`): `max_body_bytes` for `/v1`, `max_web_body_bytes` for everything else (pages,
forms, the web JSON API). This module answers the refusal in the route family's shape: OpenAI's error
on `/v1`, the page or JSON error of the web routes elsewhere.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import body_limit

from dialoop.serve.openai_errors import OpenAIError, is_v1

# Starlette raises this private HTTPException subclass when a body passes its limit (FastAPI itself
# finds it the same way); without it, the refusal keeps Starlette's plain "Content Too Large"
_TOO_LARGE: type[Exception] | None = getattr(body_limit, "_RequestBodyTooLarge", None)


def too_large_message(limit: int | None) -> str:
    if limit is None:
        return "The request body is too large for this route."
    return f"The request body is larger than {limit} bytes, the most this route accepts."


async def _too_large(request: Request, exc: Exception) -> Response:
    message = too_large_message(request.scope.get(body_limit.MAX_BODY_SIZE_SCOPE_KEY))
    if is_v1(request):
        error = OpenAIError(413, message, code="request_too_large")
        return JSONResponse(error.body(), status_code=413)
    # the app's handler of HTTP errors: an error page for a page visit, FastAPI's JSON otherwise
    handler = request.app.exception_handlers.get(StarletteHTTPException, http_exception_handler)
    answer: Response = await handler(request, StarletteHTTPException(413, message))
    return answer


def install_body_limits(app: FastAPI) -> None:
    """413s in the route family's shape, with the limit in the message."""
    if _TOO_LARGE is not None:
        app.add_exception_handler(_TOO_LARGE, _too_large)
