"""Accounts in the web: signed session cookies, CSRF tokens, login and logout, role dependencies.

Every browser gets one HMAC-signed, HttpOnly, SameSite=Lax cookie holding a random session id and, once
logged in, the user id (Secure when the request came over TLS). The session id is replaced at login and
logout, so a token seen before login is useless after it. The CSRF token is an HMAC of the session id:
pages put it in `<meta name="csrf-token">` and in forms, and `csrf_protect` checks it on every
state-changing request.

    @router.post("/things", dependencies=[Depends(csrf_protect)])
    def add_thing(user: Annotated[User, Depends(require_role("trainer", "admin"))]) -> ...
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dialoop.serve.deps import SessionDep
from dialoop.settings import settings
from dialoop.store.accounts import authenticate
from dialoop.store.models import ROLES, User

log = logging.getLogger(__name__)

SESSION_COOKIE = "dialoop_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOGIN_PATH = "/login"
_MAX_TRACKED_LOGINS = 10_000


class WebSettings(BaseSettings):
    """Web login knobs; env vars `DIALOOP_*` (e.g. DIALOOP_TRUSTED_PROXIES=10.0.0.5)."""

    model_config = SettingsConfigDict(env_prefix="DIALOOP_", extra="ignore")

    secret_key: str | None = None  # signs cookies; default: a random key kept in $DIALOOP_HOME/secret_key
    trusted_proxies: str = ""  # comma-separated client IPs whose X-Forwarded-Proto is believed ("*": any)
    session_hours: float = 24 * 14  # a login lasts this long
    login_attempts: int = 5  # failed logins per name and client address ...
    login_window_s: float = 300.0  # ... within this window, before further tries get 429


@dataclass
class _AuthState:
    """Per-app state: settings, the signing key, ended sessions, recent failed logins."""

    config: WebSettings
    key: bytes
    ended: dict[str, float] = field(default_factory=dict)  # session id -> when its cookie would expire
    failures: dict[tuple[str, str], list[float]] = field(default_factory=dict)


def _load_key(config: WebSettings) -> bytes:
    """The configured secret, else a random one created once (mode 0600) in the Dialoop home."""
    if config.secret_key:
        return config.secret_key.encode()
    path = Path(settings().home) / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first: use theirs
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            log.info("created the cookie signing key %s", path)
    return path.read_text().strip().encode()


def _state(request: Request) -> _AuthState:
    state: _AuthState | None = getattr(request.app.state, "auth", None)
    if state is None:
        config = WebSettings()
        state = _AuthState(config=config, key=_load_key(config))
        request.app.state.auth = state
    return state


def configure_auth(app: Any, config: WebSettings) -> None:
    """Use `config` for `app` instead of the environment (tests, embedding)."""
    app.state.auth = _AuthState(config=config, key=_load_key(config))


@dataclass(frozen=True)
class WebSession:
    """What the session cookie says: a random id, the user (if logged in), when it was issued."""

    sid: str
    user_id: int | None = None
    fingerprint: str = ""  # of the user's password hash: changing the password ends older sessions
    issued: float = 0.0
    new: bool = False  # created by this request: the response must set the cookie

    @classmethod
    def fresh(cls, user: User | None = None) -> WebSession:
        return cls(
            sid=secrets.token_urlsafe(18),
            user_id=user.id if user else None,
            fingerprint=_fingerprint(user) if user else "",
            issued=time.time(),
            new=True,
        )


def _fingerprint(user: User) -> str:
    return hashlib.sha256(user.password_hash.encode()).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, purpose: str, payload: str) -> str:
    return _b64(hmac.new(key, f"{purpose}:{payload}".encode(), hashlib.sha256).digest())


def _encode(state: _AuthState, ws: WebSession) -> str:
    payload = _b64(json.dumps([ws.sid, ws.user_id, ws.fingerprint, int(ws.issued)]).encode())
    return f"{payload}.{_sign(state.key, 'session', payload)}"


def _decode(state: _AuthState, value: str) -> WebSession | None:
    payload, _, signature = value.partition(".")
    if not hmac.compare_digest(signature, _sign(state.key, "session", payload)):
        return None
    try:
        sid, user_id, fingerprint, issued = json.loads(_unb64(payload))
    except ValueError:
        return None
    if time.time() - issued > state.config.session_hours * 3600 or sid in state.ended:
        return None
    return WebSession(sid=sid, user_id=user_id, fingerprint=fingerprint, issued=issued)


def web_session(request: Request) -> WebSession:
    """This request's session from its cookie, or a new anonymous one (see `apply_session_cookie`)."""
    ws: WebSession | None = getattr(request.state, "web_session", None)
    if ws is None:
        raw = request.cookies.get(SESSION_COOKIE)
        ws = (_decode(_state(request), raw) if raw else None) or WebSession.fresh()
        request.state.web_session = ws
    return ws


def is_https(request: Request) -> bool:
    """True when the browser talks TLS: directly, or through a trusted proxy's X-Forwarded-Proto."""
    if request.url.scheme == "https":
        return True
    trusted = {p.strip() for p in _state(request).config.trusted_proxies.split(",") if p.strip()}
    client = request.client.host if request.client else ""
    if trusted and ("*" in trusted or client in trusted):
        proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        return proto == "https"
    return False


def apply_session_cookie(request: Request, response: Response) -> None:
    """Set the session cookie on `response` when this request started or replaced the session."""
    ws = web_session(request)
    if not ws.new:
        return
    state = _state(request)
    response.set_cookie(
        SESSION_COOKIE,
        _encode(state, ws),
        max_age=int(state.config.session_hours * 3600),
        path="/",
        httponly=True,
        samesite="lax",
        secure=is_https(request),
    )


def _replace_session(request: Request, user: User | None) -> WebSession:
    """End the current session id (login, logout) and start a new one for `user`."""
    state = _state(request)
    old = web_session(request)
    if not old.new:
        state.ended[old.sid] = old.issued + state.config.session_hours * 3600
    now = time.time()
    state.ended = {sid: until for sid, until in state.ended.items() if until > now}
    ws = WebSession.fresh(user)
    request.state.web_session = ws
    _set_user(request, user)
    return ws


def csrf_token(request: Request) -> str:
    """The CSRF token of this request's session, for a meta tag, a form field or an `X-CSRF-Token` header."""
    return _sign(_state(request).key, "csrf", web_session(request).sid)


async def csrf_protect(request: Request) -> None:
    """Reject (403) a state-changing request whose CSRF token (header or form field) is missing or wrong."""
    if request.method in SAFE_METHODS:
        return
    ws = web_session(request)
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        value = (await request.form()).get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    # a new session has no cookie yet, so no page can hold its token
    if ws.new or not sent or not hmac.compare_digest(sent, csrf_token(request)):
        raise HTTPException(403, "CSRF token missing or invalid: reload the page and try again")


@dataclass(frozen=True)
class PageUser:
    """Who is logged in, as the layout shows it (safe to read after the request's DB session ended)."""

    id: int
    name: str
    role: str


def _set_user(request: Request, user: User | None) -> None:
    request.state.user = user
    request.state.page_user = PageUser(user.id, user.name, user.role) if user is not None else None


def page_user(request: Request) -> PageUser | None:
    """The logged-in user of this request as `PageUser`, when a route dependency has looked them up."""
    found: PageUser | None = getattr(request.state, "page_user", None)
    return found


def optional_user(request: Request, session: SessionDep) -> User | None:
    """The logged-in user, or None."""
    if hasattr(request.state, "user"):
        cached: User | None = request.state.user
        return cached
    ws = web_session(request)
    user = session.get(User, ws.user_id) if ws.user_id is not None else None
    if user is not None and not hmac.compare_digest(ws.fingerprint, _fingerprint(user)):
        user = None
    _set_user(request, user)
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


def _no_users(session: Session) -> bool:
    return session.scalar(select(func.count()).select_from(User)) == 0


def _throttled(request: Request, name: str) -> float:
    """Seconds until another login try for `name` from this client is allowed (0: allowed now)."""
    state = _state(request)
    key = (request.client.host if request.client else "", name.lower())
    now = time.time()
    recent = [t for t in state.failures.get(key, []) if now - t < state.config.login_window_s]
    state.failures[key] = recent
    if len(recent) < state.config.login_attempts:
        return 0.0
    return state.config.login_window_s - (now - recent[0])


def _record_failure(request: Request, name: str) -> None:
    state = _state(request)
    key = (request.client.host if request.client else "", name.lower())
    now = time.time()
    state.failures.setdefault(key, []).append(now)
    if len(state.failures) > _MAX_TRACKED_LOGINS:  # a flood of made-up names must not grow memory forever
        window = state.config.login_window_s
        state.failures = {k: ts for k, ts in state.failures.items() if now - ts[-1] < window}


router = APIRouter(tags=["auth"])


def _login_page(request: Request, session: Session, next_url: str, error: str = "", status: int = 200) -> Any:
    from dialoop.serve.pages import render  # pages imports this module for the session and token

    return render(
        request,
        "login.html",
        {"next": next_url, "error": error, "no_users": _no_users(session)},
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
    _replace_session(request, user)
    response = RedirectResponse(safe_next(next), status_code=303)
    apply_session_cookie(request, response)
    log.info("user %s logged in", user.name)
    return response


@router.post("/logout", include_in_schema=False, dependencies=[CsrfProtect])
def logout(request: Request) -> Response:
    """End the session and go to the login page; a copy of its cookie stops working too (until a restart)."""
    _replace_session(request, None)
    response = RedirectResponse(LOGIN_PATH, status_code=303)
    apply_session_cookie(request, response)
    return response
