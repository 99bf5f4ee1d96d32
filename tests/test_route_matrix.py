"""Access control of every route, generated from the app's routes, over real HTTP on both stores.

Each route's access dependency (`current_user`, `require_role(...)`, `api_user`, `api_admin`) says who may
call it; a route with none must be on the short PUBLIC list, so a new route without a role check fails
here. Every route is then called as every role (anonymous, user, trainer, admin, a user's API key, an
admin's API key): the refused get 401/403, the admitted never do (nor a 5xx). And every state-changing web
route must check the CSRF token: called by an admitted user without it, or with a wrong one, it is 403.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts  # type: ignore[attr-defined,unused-ignore]
from webclient import Live, WebClient, live_web_server

from dialoop.serve.auth import current_user
from dialoop.serve.deps import api_admin, api_user
from dialoop.serve.sessions import SAFE_METHODS, csrf_protect
from dialoop.store import session_scope
from dialoop.store.accounts import create_api_key, get_user

# routes anyone may call: the probes, the login form, the site's entry, static files, the API docs, and
# /v1's answer to unknown URLs
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/"),
    ("GET", "/login"),
    ("POST", "/login"),
    ("POST", "/logout"),
    ("GET", "/static/{path:path}"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
}
V1_FALLBACK = "/v1/{path:path}"
# admitted calls that would start real work from an empty request (an iteration, comparison tasks):
# their refusals are checked, their admitted cells are not called
NO_ADMITTED_CALL = {("POST", "/admin/iterations"), ("POST", "/api/trainer/tasks/next")}

COOKIE_ROLES = {"anonymous": None, "user": "alice", "trainer": "tess", "admin": "root"}
KEY_ROLES = {"user key": "alice", "admin key": "root"}
MISSING_ID = "999999"


@dataclass(frozen=True)
class Access:
    """Who a route admits: web roles by cookie, or API keys (admin keys only when `admin_key`)."""

    web_roles: frozenset[str] = frozenset()
    api: bool = False
    admin_key: bool = False

    def admits(self, caller: str) -> bool:
        if caller == "anonymous":
            return False
        if caller in KEY_ROLES:
            return self.api and (caller == "admin key" or not self.admin_key)
        return caller in self.web_roles

    def refusals(self, caller: str, method: str) -> set[int]:
        """The statuses a caller this route does not admit may get."""
        if caller == "anonymous" or (caller in KEY_ROLES) != self.api:
            # without a session, a state-changing web call has no CSRF token either: 403 may come first
            return {401} if self.api or method in SAFE_METHODS else {401, 403}
        return {403}


def _calls(dependant: Any) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


def access_of(route: Any) -> Access | None:
    """The route's access, from its dependencies; None when it has no access check."""
    calls = list(_calls(route.dependant))
    if api_admin in calls:
        return Access(api=True, admin_key=True)
    if api_user in calls:
        return Access(api=True)
    roles = [
        set(inspect.getclosurevars(call).nonlocals["roles"])
        for call in calls
        if getattr(call, "__name__", "") == "has_role"
    ]
    if roles:
        return Access(web_roles=frozenset(set.intersection(*roles)))
    if current_user in calls:
        return Access(web_roles=frozenset({"user", "trainer", "admin"}))
    return None


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    access: Access | None
    body: bool
    csrf: bool

    def url(self) -> str:
        return re.sub(r"\{[^}]+\}", MISSING_ID, self.path)


def endpoints(app: FastAPI) -> list[Endpoint]:
    found = []
    for route in iter_route_contexts(app.router.routes):
        dependant = getattr(route, "dependant", None)
        for method in sorted(route.methods or ()):
            if method == "HEAD" or route.path == V1_FALLBACK:
                continue
            if dependant is None:  # the API docs (plain Starlette routes)
                found.append(Endpoint(method, route.path, None, False, False))
                continue
            csrf = csrf_protect in list(_calls(dependant))
            body = getattr(route, "body_field", None) is not None
            found.append(Endpoint(method, route.path, access_of(route), body, csrf))
    return found


@pytest.fixture
def live(db_url: str, tiny_model_dir: Path) -> Iterator[Live]:
    with live_web_server(db_url, tiny_model_dir, preload=False) as server:
        yield server


def callers(server: Live) -> dict[str, httpx.Client | WebClient]:
    found: dict[str, httpx.Client | WebClient] = {}
    for role, name in COOKIE_ROLES.items():
        found[role] = server.client(name)
    with session_scope(server.app.state.engine) as session:
        keys = {}
        for role, name in KEY_ROLES.items():
            user = get_user(session, name)
            assert user is not None
            keys[role] = create_api_key(session, user)[1]
    for role, key in keys.items():
        found[role] = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
    return found


def call(caller: httpx.Client | WebClient, endpoint: Endpoint, *, csrf: str | None = None) -> httpx.Response:
    """Call as `caller` (a web client sends its page's CSRF token unless `csrf` replaces it)."""
    headers = {"Accept": "application/json"}
    http = caller.http if isinstance(caller, WebClient) else caller
    if isinstance(caller, WebClient):
        headers["X-CSRF-Token"] = caller.csrf if csrf is None else csrf
    body = {} if endpoint.body else None
    return http.request(endpoint.method, endpoint.url(), json=body, headers=headers)


@pytest.mark.slow
def test_every_route_has_an_access_check_and_admits_exactly_its_roles(live: Live) -> None:
    routes = endpoints(live.app)
    unchecked = [(e.method, e.path) for e in routes if e.access is None and (e.method, e.path) not in PUBLIC]
    assert not unchecked, f"routes without a role check (add one, or list them in PUBLIC): {unchecked}"
    who = callers(live)
    wrong = []
    cells = 0
    for endpoint in routes:
        if endpoint.access is None:
            continue
        for role, caller in who.items():
            admitted = endpoint.access.admits(role)
            if admitted and (endpoint.method, endpoint.path) in NO_ADMITTED_CALL:
                continue
            status = call(caller, endpoint).status_code
            cells += 1
            if admitted and (status in (401, 403) or status >= 500):
                wrong.append((endpoint.method, endpoint.path, role, status, "admitted"))
            if not admitted and status not in endpoint.access.refusals(role, endpoint.method):
                wrong.append((endpoint.method, endpoint.path, role, status, "refused"))
    assert not wrong, "\n".join(map(str, wrong))
    assert cells > 300


@pytest.mark.slow
def test_every_state_changing_web_route_refuses_a_missing_or_wrong_csrf_token(live: Live) -> None:
    routes = endpoints(live.app)
    changing = [
        e for e in routes if e.method not in SAFE_METHODS and e.access is not None and not e.access.api
    ]
    assert not [(e.method, e.path) for e in changing if not e.csrf], "state-changing web routes without CSRF"
    who = callers(live)
    wrong = []
    for endpoint in changing:
        assert endpoint.access is not None
        role = "admin" if "admin" in endpoint.access.web_roles else sorted(endpoint.access.web_roles)[0]
        caller = who[role]
        assert isinstance(caller, WebClient)
        for token in ("", "forged-token"):
            answer = call(caller, endpoint, csrf=token)
            if answer.status_code != 403 or "CSRF" not in answer.text:
                wrong.append((endpoint.method, endpoint.path, repr(token), answer.status_code))
    assert not wrong, wrong
    assert len(changing) > 30
    # login and logout check it too
    anonymous = httpx.post(f"{live.url}/login", data={"name": "root", "password": "x"})
    assert anonymous.status_code == 403 and "CSRF" in anonymous.text
