"""Accounts in the web: login and logout with throttling, the logged-in user, role dependencies.

Sessions and CSRF tokens are `dialoop.serve.sessions`; here is who may do what:

    @router.post("/things", dependencies=[Depends(csrf_protect)])
    def add_thing(user: Annotated[User, Depends(require_role("trainer", "admin"))]) -> ...

Login throttling counts failures in the shared state (every process, kept across restarts) three ways, so
that guessing is slow while nobody can lock the real user out (docs/deployment.md, "Login throttling"):

- per name and client, the client being the browser's signed device cookie (set at each successful login)
  or else the address: `login_attempts` failures in `login_window_s` stop that pair until the window ends;
- per address, any names: `login_ip_attempts` failures stop the address (password spraying), except for
  browsers with the name's device cookie;
- per name, from anywhere: beyond `login_name_attempts` failures the name's tries are spaced out, 1 s
  doubling up to `login_max_delay_s`, except from the name's device cookie or an address it has logged in
  from before. A delay is a 429 with Retry-After, never a sleep that holds a worker.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    device_id,
    fingerprint,
    replace_session,
    set_device_cookie,
    set_user,
    web_session,
)
from dialoop.store.accounts import authenticate, has_users
from dialoop.store.models import ROLES, User

log = logging.getLogger(__name__)

LOGIN_PATH = "/login"


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


@dataclass(frozen=True)
class LoginClient:
    """Who tries to log in as whom: the name (lower-cased), the address, and the device when known."""

    name: str
    ip: str
    device: str | None

    @property
    def key(self) -> str:
        return f"device:{self.device}" if self.device else f"ip:{self.ip}"

    @classmethod
    def of(cls, request: Request, name: str) -> LoginClient:
        return cls(name.lower(), request.client.host if request.client else "", device_id(request, name))


def login_wait(request: Request, client: LoginClient) -> float:
    """Seconds until `client` may try to log in again (0: now); the policy is the module's docstring."""
    state = auth_state(request)
    config = state.config
    record = state.shared.login_record(client.name, client.key, client.ip, config.login_window_s)
    now = time.time()
    waits = [0.0]
    if record.pair >= config.login_attempts and record.pair_oldest is not None:
        waits.append(record.pair_oldest + config.login_window_s - now)
    if client.device is None:
        if record.ip >= config.login_ip_attempts and record.ip_oldest is not None:
            waits.append(record.ip_oldest + config.login_window_s - now)
        extra = record.name - config.login_name_attempts
        if not record.known_ip and extra >= 0 and record.name_latest is not None:
            waits.append(record.name_latest + min(config.login_max_delay_s, 2.0**extra) - now)
    return max(waits)


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
    client = LoginClient.of(request, name)
    shared = auth_state(request).shared
    wait = login_wait(request, client)
    if wait > 0:
        response = _login_page(
            request, session, safe_next(next), f"Too many failed logins: try again in {int(wait) + 1} s.", 429
        )
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    user = authenticate(session, name, password)
    if user is None:
        shared.record_failure(client.name, client.key, client.ip)
        log.info("failed login for %r", name)
        return _login_page(request, session, safe_next(next), "Wrong name or password.", 400)
    shared.record_success(client.name, client.key, client.ip)
    replace_session(request, user)
    response = RedirectResponse(safe_next(next), status_code=303)
    apply_session_cookie(request, response)
    set_device_cookie(request, response, name)
    log.info("user %s logged in", user.name)
    return response


@router.post("/logout", include_in_schema=False, dependencies=[CsrfProtect])
def logout(request: Request) -> Response:
    """End the session and go to the login page; a copy of its cookie stops working too, on every
    process and after restarts."""
    replace_session(request, None)
    response = RedirectResponse(LOGIN_PATH, status_code=303)
    apply_session_cookie(request, response)
    return response
