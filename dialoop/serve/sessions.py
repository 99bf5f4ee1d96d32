"""Browser sessions: the signed session cookie, CSRF tokens, and who is logged in as pages show it.

Every browser gets one HMAC-signed, HttpOnly, SameSite=Lax cookie holding a random session id and, once
logged in, the user id (Secure when the request came over TLS). The session id is replaced at login and
logout, so a token seen before login is useless after it; the ended id is kept in the shared state
(`dialoop.store.webstate`: the store, or Redis), so a copy of a logged-out cookie stays dead after a restart
and on every server process. The CSRF token is an HMAC of the session id:
pages put it in `<meta name="csrf-token">` and in forms, and `csrf_protect` checks it on every
state-changing request.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from dialoop.settings import WebSettings, settings
from dialoop.store.models import User
from dialoop.store.webstate import WebState, web_state

log = logging.getLogger(__name__)

SESSION_COOKIE = "dialoop_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
DEVICE_COOKIE = "dialoop_device"
DEVICE_DAYS = 365
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class AuthState:
    """Per-app state: settings, the signing key, and the state shared by every process (ended sessions,
    login failures)."""

    config: WebSettings
    key: bytes
    shared: WebState


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


def auth_state(request: Request) -> AuthState:
    """The app's session state, made from the settings' web knobs unless `configure_auth` set it."""
    state: AuthState | None = getattr(request.app.state, "auth", None)
    if state is None:
        configure_auth(request.app, settings().web)
        state = request.app.state.auth
    return state


def configure_auth(app: Any, config: WebSettings, redis_url: str | None = None) -> None:
    """Use `config` for `app` instead of the settings' web knobs (tests, embedding); the shared state is in
    Redis at `redis_url` (default: the settings' `redis_url`), else in the app's store."""
    shared = web_state(app.state.engine, redis_url or settings().redis_url)
    app.state.auth = AuthState(config=config, key=_load_key(config), shared=shared)


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
            fingerprint=fingerprint(user) if user else "",
            issued=time.time(),
            new=True,
        )


def fingerprint(user: User) -> str:
    return hashlib.sha256(user.password_hash.encode()).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, purpose: str, payload: str) -> str:
    return _b64(hmac.new(key, f"{purpose}:{payload}".encode(), hashlib.sha256).digest())


def _encode(state: AuthState, ws: WebSession) -> str:
    payload = _b64(json.dumps([ws.sid, ws.user_id, ws.fingerprint, int(ws.issued)]).encode())
    return f"{payload}.{_sign(state.key, 'session', payload)}"


def _decode(state: AuthState, value: str) -> WebSession | None:
    payload, _, signature = value.partition(".")
    if not hmac.compare_digest(signature, _sign(state.key, "session", payload)):
        return None
    try:
        sid, user_id, fingerprint, issued = json.loads(_unb64(payload))
    except ValueError:
        return None
    if time.time() - issued > state.config.session_hours * 3600 or state.shared.session_revoked(sid):
        return None
    return WebSession(sid=sid, user_id=user_id, fingerprint=fingerprint, issued=issued)


def web_session(request: Request) -> WebSession:
    """This request's session from its cookie, or a new anonymous one (see `apply_session_cookie`).

    The first call of a request asks the shared state whether the cookie's session was ended: call it from
    a thread (sync routes and dependencies), or await `web_session_async` on the event loop."""
    ws: WebSession | None = getattr(request.state, "web_session", None)
    if ws is None:
        raw = request.cookies.get(SESSION_COOKIE)
        ws = (_decode(auth_state(request), raw) if raw else None) or WebSession.fresh()
        request.state.web_session = ws
    return ws


async def web_session_async(request: Request) -> WebSession:
    """`web_session` for async code: the shared state is asked in a worker thread."""
    ws: WebSession | None = getattr(request.state, "web_session", None)
    return ws if ws is not None else await run_in_threadpool(web_session, request)


def is_https(request: Request) -> bool:
    """True when the browser talks TLS: directly, or through a trusted proxy's X-Forwarded-Proto."""
    if request.url.scheme == "https":
        return True
    trusted = {p.strip() for p in auth_state(request).config.trusted_proxies.split(",") if p.strip()}
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
    state = auth_state(request)
    response.set_cookie(
        SESSION_COOKIE,
        _encode(state, ws),
        max_age=int(state.config.session_hours * 3600),
        path="/",
        httponly=True,
        samesite="lax",
        secure=is_https(request),
    )


def replace_session(request: Request, user: User | None) -> WebSession:
    """End the current session id (login, logout) and start a new one for `user`."""
    state = auth_state(request)
    old = web_session(request)
    if not old.new:
        state.shared.revoke_session(old.sid, old.issued + state.config.session_hours * 3600)
    ws = WebSession.fresh(user)
    request.state.web_session = ws
    set_user(request, user)
    return ws


def device_id(request: Request, name: str) -> str | None:
    """The id of this browser when its device cookie says `name` logged in on it before, else None.

    The cookie is signed: a device id cannot be made up. Login throttling treats a known device apart from
    its address, so that failures of others cannot lock a user out of a browser they have used."""
    raw = request.cookies.get(DEVICE_COOKIE)
    if not raw:
        return None
    payload, _, signature = raw.partition(".")
    if not hmac.compare_digest(signature, _sign(auth_state(request).key, "device", payload)):
        return None
    try:
        owner, device, issued = json.loads(_unb64(payload))
    except ValueError:
        return None
    if owner != name.lower() or time.time() - issued > DEVICE_DAYS * 86400:
        return None
    return str(device)


def set_device_cookie(request: Request, response: Response, name: str) -> None:
    """Remember on this browser that `name` logged in on it (see `device_id`)."""
    device = device_id(request, name) or secrets.token_urlsafe(12)
    payload = _b64(json.dumps([name.lower(), device, int(time.time())]).encode())
    response.set_cookie(
        DEVICE_COOKIE,
        f"{payload}.{_sign(auth_state(request).key, 'device', payload)}",
        max_age=DEVICE_DAYS * 86400,
        path="/login",
        httponly=True,
        samesite="strict",
        secure=is_https(request),
    )


def csrf_token(request: Request) -> str:
    """The CSRF token of this request's session, for a meta tag, a form field or an `X-CSRF-Token` header."""
    return _sign(auth_state(request).key, "csrf", web_session(request).sid)


async def csrf_protect(request: Request) -> None:
    """Reject (403) a state-changing request whose CSRF token (header or form field) is missing or wrong."""
    if request.method in SAFE_METHODS:
        return
    ws = await web_session_async(request)
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


def set_user(request: Request, user: User | None) -> None:
    request.state.user = user
    request.state.page_user = PageUser(user.id, user.name, user.role) if user is not None else None


def page_user(request: Request) -> PageUser | None:
    """The logged-in user of this request as `PageUser`, when a route dependency has looked them up."""
    found: PageUser | None = getattr(request.state, "page_user", None)
    return found
