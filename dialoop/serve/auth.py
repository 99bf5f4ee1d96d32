"""Accounts in the web: login and logout, the logged-in user, role dependencies.

Sessions and CSRF tokens are `dialoop.serve.sessions`; here is who may do what:

    @router.post("/things", dependencies=[Depends(csrf_protect)])
    def add_thing(user: Annotated[User, Depends(require_role("trainer", "admin"))]) -> ...
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from dialoop.serve.deps import SessionDep
from dialoop.serve.pages import render
from dialoop.serve.sessions import (
    apply_session_cookie,
    auth_state,
    csrf_protect,
    fingerprint,
    replace_session,
    set_user,
    web_session,
)
from dialoop.store.accounts import authenticate, has_users
from dialoop.store.models import ROLES, User

log = logging.getLogger(__name__)

LOGIN_PATH = "/login"
_MAX_TRACKED_LOGINS = 10_000


def optional_user(request: Request, session: SessionDep) -> User | None:
    """The logged-in user, or None."""
    if hasattr(request.state, "user"):
        cached: User | None = request.state.user
        return cached
    ws = web_session(request)
    user = session.get(User, ws.user_id) if ws.user_id is not None else None
    if user is not None and not hmac.compare_digest(ws.fingerprint, fingerprint(user)):
        user = None
    set_user(request, user)
    return user


def login_required(request: Request) -> HTTPException:
    """A page visit is sent to the login page (303); any other call gets 401."""
    if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return HTTPException(
            303, "login required", headers={"Location": f"{LOGIN_PATH}?next={quote(target)}"}
        )
    return HTTPException(401, "login required")


def current_user(request: Request, user: Annotated[User | None, Depends(optional_user)]) -> User:
    """The logged-in user; anonymous page visits are redirected to the login page, other calls get 401."""
    if user is None:
        raise login_required(request)
    return user


def require_role(*roles: str) -> Callable[..., User]:
    """A dependency that lets in the logged-in users with one of `roles` (403 for the others)."""
    unknown = set(roles) - set(ROLES)
    if not roles or unknown:
        raise ValueError(f"require_role needs roles among {', '.join(ROLES)}, got {roles}")

    def has_role(user: Annotated[User, Depends(current_user)]) -> User:
        if user.role not in roles:
            raise HTTPException(403, f"this needs the role {' or '.join(roles)}; you are a {user.role}")
        return user

    return has_role


CurrentUser = Annotated[User, Depends(current_user)]
OptionalUser = Annotated[User | None, Depends(optional_user)]
CsrfProtect = Depends(csrf_protect)


def safe_next(target: str | None, default: str = "/") -> str:
    """`target` when it is a path on this site, else `default` (no open redirects to other hosts)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")) or "\\" in target:
        return default
    return target


def _throttled(request: Request, name: str) -> float:
    """Seconds until another login try for `name` from this client is allowed (0: allowed now)."""
    state = auth_state(request)
    key = (request.client.host if request.client else "", name.lower())
    now = time.time()
    recent = [t for t in state.failures.get(key, []) if now - t < state.config.login_window_s]
    state.failures[key] = recent
    if len(recent) < state.config.login_attempts:
        return 0.0
    return state.config.login_window_s - (now - recent[0])


def _record_failure(request: Request, name: str) -> None:
    state = auth_state(request)
    key = (request.client.host if request.client else "", name.lower())
    now = time.time()
    state.failures.setdefault(key, []).append(now)
    if len(state.failures) > _MAX_TRACKED_LOGINS:  # a flood of made-up names must not grow memory forever
        window = state.config.login_window_s
        state.failures = {k: ts for k, ts in state.failures.items() if now - ts[-1] < window}


router = APIRouter(tags=["auth"])


def _login_page(request: Request, session: Session, next_url: str, error: str = "", status: int = 200) -> Any:
    return render(
        request,
        "login.html",
        {"next": next_url, "error": error, "no_users": not has_users(session)},
        status_code=status,
    )


@router.get(LOGIN_PATH, include_in_schema=False)
def login_page(request: Request, session: SessionDep, user: OptionalUser, next: str = "/") -> Any:
    """The login form; a logged-in user goes straight on to `next`."""
    if user is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, session, safe_next(next))


@router.post(LOGIN_PATH, include_in_schema=False, dependencies=[CsrfProtect])
def login(
    request: Request,
    session: SessionDep,
    name: Annotated[str, Form(max_length=100)],
    password: Annotated[str, Form(max_length=1000)],
    next: Annotated[str, Form()] = "/",
) -> Any:
    """Check the name and password; on success start a new session and go on to `next`."""
    name = name.strip()
    wait = _throttled(request, name)
    if wait > 0:
        response = _login_page(
            request, session, safe_next(next), f"Too many failed logins: try again in {int(wait) + 1} s.", 429
        )
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    user = authenticate(session, name, password)
    if user is None:
        _record_failure(request, name)
        log.info("failed login for %r", name)
        return _login_page(request, session, safe_next(next), "Wrong name or password.", 400)
    replace_session(request, user)
    response = RedirectResponse(safe_next(next), status_code=303)
    apply_session_cookie(request, response)
    log.info("user %s logged in", user.name)
    return response


@router.post("/logout", include_in_schema=False, dependencies=[CsrfProtect])
def logout(request: Request) -> Response:
    """End the session and go to the login page; a copy of its cookie stops working too (until a restart)."""
    replace_session(request, None)
    response = RedirectResponse(LOGIN_PATH, status_code=303)
    apply_session_cookie(request, response)
    return response
