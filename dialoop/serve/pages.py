"""Server-rendered pages: the Jinja2 templates, the shared layout's context, security headers, static files.

    return render(request, "chat.html", {"conversation": conv})   # extends base.html

`base.html` gets `user`, `csrf_token` and `nav` (the links the user's role may follow). Every page is
sent with a strict Content-Security-Policy (scripts only from /static, no inline script or style), so
even a rendering bug cannot run script taken from a message.
"""

from __future__ import annotations

import mimetypes
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from dialoop import __version__
from dialoop.serve.openai_errors import OpenAIError, allowed_methods, is_v1
from dialoop.serve.sessions import apply_session_cookie, csrf_token, page_user

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
TEMPLATES_DIR = WEB_DIR / "templates"
STATIC_DIR = WEB_DIR / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

# (label, path, roles allowed): the top bar shows the links the user's role may follow
NAV: list[tuple[str, str, tuple[str, ...]]] = [
    ("Chat", "/chat", ("admin", "trainer", "user")),
    ("API keys", "/keys", ("admin", "trainer", "user")),
]

templates = Jinja2Templates(directory=TEMPLATES_DIR)
templates.env.globals["version"] = __version__


def add_nav_link(label: str, path: str, *roles: str) -> None:
    """Show `label` -> `path` in the top bar to users with one of `roles` (trainer and admin pages)."""
    if all(existing[1] != path for existing in NAV):
        NAV.append((label, path, roles))


def static_url(path: str) -> str:
    """The URL of a static file, with its mtime so browsers fetch a changed file at once."""
    file = STATIC_DIR / path
    stamp = int(file.stat().st_mtime) if file.exists() else 0
    return f"/static/{path}?v={stamp}"


templates.env.globals["static_url"] = static_url


def render(
    request: Request, name: str, context: dict[str, Any] | None = None, *, status_code: int = 200
) -> Response:
    """Render template `name` with the layout's context; sets the security headers and the session cookie."""
    user = page_user(request)
    ctx = {
        "user": user,
        "csrf_token": csrf_token(request),
        "nav": [(label, path) for label, path, roles in NAV if user is not None and user.role in roles],
        "path": request.url.path,
        **(context or {}),
    }
    response = templates.TemplateResponse(request, name, ctx, status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    apply_session_cookie(request, response)
    return response


def wants_page(request: Request) -> bool:
    """True for a browser visiting a page or posting a form (not a script's call, not the /v1 API)."""
    path = request.url.path
    return (
        request.method in ("GET", "POST")
        and "text/html" in request.headers.get("accept", "")
        and not path.startswith(("/v1/", "/api/", "/static/"))
    )


async def _error_page(request: Request, exc: Exception) -> Response:
    """Errors of page visits as a page in the layout; /v1's in OpenAI's shape; the rest FastAPI's JSON.

    A 405 names in `Allow` the methods of every route at the path, not only of the first one.
    """
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        allow = {"Allow": ", ".join(allowed_methods(request))}
        exc = StarletteHTTPException(405, exc.detail, headers={**(exc.headers or {}), **allow})
    if is_v1(request) and exc.status_code >= 400:  # e.g. FastAPI's 400 for a body that is not UTF-8
        error = OpenAIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
        return JSONResponse(error.body(), status_code=exc.status_code, headers=error.headers)
    if exc.status_code < 400 or not wants_page(request):
        return await http_exception_handler(request, exc)
    reason = (
        HTTPStatus(exc.status_code).phrase if exc.status_code in HTTPStatus._value2member_map_ else "Error"
    )
    context = {"status_code": exc.status_code, "reason": reason, "detail": exc.detail}
    response = render(request, "error.html", context, status_code=exc.status_code)
    response.headers.update(exc.headers or {})
    return response


def install_error_pages(app: FastAPI) -> None:
    """Show 4xx/5xx answers to page visits as pages (403, 404 ...) instead of JSON."""
    app.add_exception_handler(StarletteHTTPException, _error_page)


router = APIRouter(include_in_schema=False)


@router.get("/static/{path:path}")
def static_file(path: str) -> FileResponse:
    """A file under dialoop/web/static (never outside it)."""
    file = (STATIC_DIR / path).resolve()
    if not file.is_relative_to(STATIC_DIR) or not file.is_file():
        raise HTTPException(404, "no such file")
    media_type = "text/javascript" if file.suffix == ".js" else mimetypes.guess_type(file.name)[0]
    return FileResponse(
        file,
        media_type=media_type,
        headers={
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },  # revalidate: cheap, never stale
    )


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/chat", status_code=303)
