"""Web login over HTTP: cookie flags, session rotation, logout, CSRF, throttling, roles, API keys; sessions
and throttling in the shared state (store or Redis), so that they survive a restart (issue #20, item 5)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import delete
from webclient import PASSWORD, make_web_app

from dialoop.serve.app import create_app
from dialoop.serve.auth import require_role
from dialoop.serve.sessions import SESSION_COOKIE, configure_auth
from dialoop.settings import WebSettings
from dialoop.store import User, session_scope
from dialoop.store.accounts import get_user, set_password
from dialoop.store.models import KnownLogin, LoginFailure, RevokedSession

_META = re.compile(r'<meta name="csrf-token" content="([^"]*)">')
HTML = {"Accept": "text/html"}
ADMINS_ONLY = require_role("admin")
TRAINERS = require_role("trainer", "admin")


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    """The server app without its lifespan: these tests need the store, not the generation worker."""
    db = tmp_path_factory.mktemp("auth-web") / "store.db"
    app = make_web_app(f"sqlite:///{db}", tiny_model_dir)

    @app.get("/test/admin-only")
    def admin_only(user: Annotated[User, Depends(ADMINS_ONLY)]) -> dict[str, str]:
        return {"name": user.name}

    @app.get("/test/trainers")
    def trainers_page(user: Annotated[User, Depends(TRAINERS)]) -> dict[str, str]:
        return {"name": user.name}

    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with_defaults = WebSettings(secret_key="test-signing-key")
    configure_auth(app, with_defaults)
    with session_scope(app.state.engine) as session:  # fresh throttling and ended sessions for each test
        for table in (LoginFailure, KnownLogin, RevokedSession):
            session.execute(delete(table))
    yield TestClient(app, follow_redirects=False)


def restarted(app: FastAPI, tiny_model_dir: Path) -> FastAPI:
    """A new server process on the same store: nothing kept in the old one's memory."""
    again = create_app(database_url=str(app.state.engine.url), model=tiny_model_dir, model_name="tiny")
    configure_auth(again, WebSettings(secret_key="test-signing-key"))
    return again


def from_address(app: FastAPI, ip: str, **kwargs: Any) -> TestClient:
    return TestClient(app, follow_redirects=False, client=(ip, 50000), **kwargs)


def token(response: httpx.Response) -> str:
    found = _META.search(response.text)
    assert found, "no CSRF token in the page"
    return found.group(1)


def login(client: TestClient, name: str, password: str = PASSWORD, next: str = "/chat") -> httpx.Response:
    csrf = token(client.get("/login"))
    return client.post("/login", data={"name": name, "password": password, "next": next, "csrf_token": csrf})


def cookie_header(response: httpx.Response) -> str:
    headers = response.headers.get_list("set-cookie")
    [cookie] = [h for h in headers if h.startswith(f"{SESSION_COOKIE}=")]
    return str(cookie)


def test_login_sets_an_httponly_samesite_cookie_and_replaces_the_session(client: TestClient) -> None:
    page = client.get("/login")
    anonymous = cookie_header(page)
    assert "HttpOnly" in anonymous and "SameSite=lax" in anonymous and "Path=/" in anonymous
    assert "Secure" not in anonymous  # plain http, no proxy
    old_token = token(page)
    response = client.post(
        "/login", data={"name": "alice", "password": PASSWORD, "next": "/chat", "csrf_token": old_token}
    )
    assert response.status_code == 303 and response.headers["location"] == "/chat"
    logged_in = cookie_header(response)
    assert "HttpOnly" in logged_in and "SameSite=lax" in logged_in
    assert logged_in.split(";")[0] != anonymous.split(";")[0]
    new_token = token(client.get("/chat", headers=HTML))
    assert new_token != old_token
    # a token from before the login does not work after it
    assert (
        client.post("/api/chat/conversations", json={}, headers={"X-CSRF-Token": old_token}).status_code
        == 403
    )
    assert (
        client.post("/api/chat/conversations", json={}, headers={"X-CSRF-Token": new_token}).status_code
        == 201
    )


def test_cookie_is_secure_over_tls_and_behind_a_trusted_proxy_only(app: FastAPI, client: TestClient) -> None:
    def first_visit(headers: dict[str, str] | None = None) -> str:
        client.cookies.clear()
        return cookie_header(client.get("/login", headers=headers))

    forwarded = {"X-Forwarded-Proto": "https"}
    assert "Secure" not in first_visit(forwarded)  # nobody is trusted to say so
    configure_auth(app, WebSettings(secret_key="test-signing-key", trusted_proxies="10.0.0.9"))
    assert "Secure" not in first_visit(forwarded)  # not that proxy
    configure_auth(app, WebSettings(secret_key="test-signing-key", trusted_proxies="testclient"))
    assert "Secure" in first_visit(forwarded)
    assert "Secure" not in first_visit()  # the proxy says plain http
    tls = TestClient(app, base_url="https://testserver", follow_redirects=False)
    assert "Secure" in cookie_header(tls.get("/login"))


def test_wrong_password_and_unknown_name_are_refused_alike(client: TestClient) -> None:
    for name, password in [("alice", "wrong"), ("nobody", PASSWORD)]:
        response = login(client, name, password)
        assert response.status_code == 400
        assert "Wrong name or password." in response.text
    assert client.get("/chat", headers=HTML).status_code == 303


def test_repeated_failed_logins_are_throttled(client: TestClient) -> None:
    for _ in range(5):
        assert login(client, "bob", "guess").status_code == 400
    refused = login(client, "bob", PASSWORD)  # even the right password waits now
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) > 0
    assert login(client, "alice").status_code == 303  # other names are not blocked


def test_logout_ends_the_session_even_for_a_copied_cookie(client: TestClient) -> None:
    assert login(client, "alice").status_code == 303
    copied = client.cookies[SESSION_COOKIE]
    csrf = token(client.get("/chat", headers=HTML))
    response = client.post("/logout", data={"csrf_token": csrf})
    assert response.status_code == 303 and response.headers["location"] == "/login"
    assert client.get("/api/chat/conversations").status_code == 401
    thief = TestClient(client.app, cookies={SESSION_COOKIE: copied})
    assert thief.get("/api/chat/conversations").status_code == 401


def test_login_and_logout_need_the_csrf_token(client: TestClient) -> None:
    client.get("/login")
    refused = client.post("/login", data={"name": "alice", "password": PASSWORD})
    assert refused.status_code == 403
    assert login(client, "alice").status_code == 303
    assert client.post("/logout", data={}).status_code == 403
    assert client.post("/logout", data={"csrf_token": "forged"}).status_code == 403
    assert client.get("/api/chat/conversations").status_code == 200  # still logged in


def test_every_state_changing_call_without_the_csrf_token_is_refused(client: TestClient) -> None:
    assert login(client, "alice").status_code == 303
    other = TestClient(client.app, follow_redirects=False)
    assert login(other, "bob").status_code == 303
    bobs_token = token(other.get("/chat", headers=HTML))
    calls = [
        ("POST", "/api/chat/conversations"),
        ("PATCH", "/api/chat/conversations/1"),
        ("DELETE", "/api/chat/conversations/1"),
        ("POST", "/api/chat/conversations/1/messages"),
        ("POST", "/api/chat/conversations/1/messages/1/replies"),
        ("POST", "/api/chat/conversations/1/generations/x/stop"),
        ("PUT", "/api/chat/conversations/1/messages/1/feedback"),
        ("POST", "/api/chat/conversations/1/messages/1/preference"),
        ("POST", "/keys"),
        ("POST", "/keys/1/revoke"),
        ("POST", "/logout"),
    ]
    for method, path in calls:
        assert client.request(method, path, json={}).status_code == 403, path
        # a token is bound to its session: another user's is no good
        assert client.request(method, path, json={}, headers={"X-CSRF-Token": bobs_token}).status_code == 403


def test_changing_the_password_ends_older_sessions(app: FastAPI, client: TestClient) -> None:
    assert login(client, "bob").status_code == 303
    assert client.get("/api/chat/conversations").status_code == 200
    with session_scope(app.state.engine) as session:
        user = get_user(session, "bob")
        assert user is not None
        set_password(session, user, "a new password")
    try:
        assert client.get("/api/chat/conversations").status_code == 401
    finally:
        with session_scope(app.state.engine) as session:
            user = get_user(session, "bob")
            assert user is not None
            set_password(session, user, PASSWORD)


def test_a_tampered_or_expired_cookie_is_an_anonymous_visit(app: FastAPI, client: TestClient) -> None:
    assert login(client, "alice").status_code == 303
    payload, signature = client.cookies[SESSION_COOKIE].split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    with session_scope(app.state.engine) as session:
        root = get_user(session, "root")
        assert root is not None
        fields[1] = root.id  # pretend to be the admin
    forged = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    intruder = TestClient(app, cookies={SESSION_COOKIE: f"{forged}.{signature}"})
    assert intruder.get("/test/admin-only").status_code == 401
    configure_auth(app, WebSettings(secret_key="test-signing-key", session_hours=0))
    assert client.get("/api/chat/conversations").status_code == 401


def test_login_redirects_only_within_the_site(client: TestClient) -> None:
    for target, expected in [
        ("/keys", "/keys"),
        ("//evil.example/x", "/"),
        ("https://evil.example", "/"),
        ("/\\evil.example", "/"),
    ]:
        client.cookies.clear()
        response = login(client, "alice", next=target)
        assert response.headers["location"] == expected, target
    assert client.get("/login?next=/keys").headers["location"] == "/keys"  # already logged in: go on


def test_require_role_admits_only_the_given_roles(client: TestClient) -> None:
    assert client.get("/test/admin-only").status_code == 401
    assert client.get("/test/admin-only", headers=HTML).headers["location"] == "/login?next=/test/admin-only"
    expected = {"root": (200, 200), "tess": (403, 200), "alice": (403, 403)}
    for name, (admin_status, trainer_status) in expected.items():
        client.cookies.clear()
        assert login(client, name).status_code == 303
        assert client.get("/test/admin-only").status_code == admin_status, name
        assert client.get("/test/trainers").status_code == trainer_status, name
    forbidden = client.get("/test/admin-only", headers=HTML)
    assert forbidden.status_code == 403 and "text/html" in forbidden.headers["content-type"]
    assert "this needs the role admin" in forbidden.text
    with pytest.raises(ValueError, match="roles among"):
        require_role("superuser")


def test_first_start_shows_how_to_create_the_first_admin(tiny_model_dir: Path, tmp_path: Path) -> None:
    empty = create_app(database_url=f"sqlite:///{tmp_path / 'empty.db'}", model=tiny_model_dir)
    page = TestClient(empty).get("/login")
    assert page.status_code == 200 and "dialoop users add NAME --role admin" in page.text
    with session_scope(empty.state.engine) as session:
        session.add(User(name="first", role="admin", password_hash="x"))
    assert "dialoop users add" not in TestClient(empty).get("/login").text


def test_api_keys_are_created_shown_once_and_revoked_in_the_ui(client: TestClient) -> None:
    assert client.get("/keys", headers=HTML).headers["location"] == "/login?next=/keys"
    assert login(client, "alice").status_code == 303
    csrf = token(client.get("/keys", headers=HTML))
    created = client.post("/keys", data={"name": "laptop", "csrf_token": csrf})
    assert created.status_code == 200
    found = re.search(r'<code id="new-key">(dl-[^<]+)</code>', created.text)
    assert found
    key = found.group(1)
    listing = client.get("/keys", headers=HTML).text
    assert key not in listing and key[:10] in listing and "laptop" in listing
    v1 = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/models", headers=v1).status_code == 200
    key_id = int(re.findall(r'data-key-id="(\d+)"', listing)[-1])

    other = TestClient(client.app, follow_redirects=False)
    assert login(other, "bob").status_code == 303
    bobs_token = token(other.get("/keys", headers=HTML))
    assert other.post(f"/keys/{key_id}/revoke", data={"csrf_token": bobs_token}).status_code == 404
    assert client.get("/v1/models", headers=v1).status_code == 200

    revoked = client.post(f"/keys/{key_id}/revoke", data={"csrf_token": csrf})
    assert revoked.status_code == 303 and revoked.headers["location"] == "/keys"
    assert client.get("/v1/models", headers=v1).status_code == 401
    assert "revoked" in client.get("/keys", headers=HTML).text


# --- issue #20, item 5: state that lived in one process's memory --------------------------------------


def test_a_logged_out_cookie_stays_invalid_after_a_restart(
    app: FastAPI, client: TestClient, tiny_model_dir: Path
) -> None:
    assert login(client, "alice").status_code == 303
    copied = client.cookies[SESSION_COOKIE]
    csrf = token(client.get("/chat", headers=HTML))
    assert client.post("/logout", data={"csrf_token": csrf}).status_code == 303
    again = restarted(app, tiny_model_dir)
    thief = TestClient(again, cookies={SESSION_COOKIE: copied})
    assert thief.get("/api/chat/conversations").status_code == 401
    # while a cookie that was never logged out keeps working across the restart
    other = TestClient(app, follow_redirects=False)
    assert login(other, "bob").status_code == 303
    kept = TestClient(again, cookies={SESSION_COOKIE: other.cookies[SESSION_COOKIE]})
    assert kept.get("/api/chat/conversations").status_code == 200


def test_login_throttling_survives_a_restart(app: FastAPI, client: TestClient, tiny_model_dir: Path) -> None:
    for _ in range(5):
        assert login(client, "bob", "guess").status_code == 400
    again = TestClient(restarted(app, tiny_model_dir), follow_redirects=False)
    assert login(again, "bob", PASSWORD).status_code == 429


def test_spraying_one_password_over_many_names_from_one_address_is_throttled(client: TestClient) -> None:
    statuses = [login(client, f"user{i}", "Summer2026!").status_code for i in range(50)]
    assert statuses[:20] == [400] * 20  # login_ip_attempts
    assert set(statuses[20:]) == {429}
    assert login(client, "alice").status_code == 429  # the address is stopped for every name ...
    refused = login(client, "alice")
    assert 0 < int(refused.headers["retry-after"]) <= 301  # ... until the window ends


def test_a_neighbour_cannot_lock_out_a_user_who_logged_in_on_that_browser_before(app: FastAPI) -> None:
    """Someone behind the user's address (same NAT) fails for the user's name: the user's browser, which
    holds the device cookie of an earlier login, still gets in with the right password."""
    user = from_address(app, "10.0.0.7")
    assert login(user, "alice").status_code == 303
    attacker = from_address(app, "10.0.0.7")
    for _ in range(30):
        assert login(attacker, "alice", "guess").status_code in (400, 429)
    assert login(attacker, "alice", PASSWORD).status_code == 429  # the attacker's browser is stopped
    user.cookies.delete(SESSION_COOKIE)
    assert login(user, "alice").status_code == 303


def test_guessing_one_name_from_many_addresses_slows_down_without_locking_the_user_out(app: FastAPI) -> None:
    """A distributed guess at one name: each address stays under its limits, so the name's tries are spaced
    out (bounded); the user logging in from an address they used before is not slowed down."""
    home = from_address(app, "192.0.2.10")
    assert login(home, "bob").status_code == 303
    statuses = []
    for i in range(12):
        statuses.append(login(from_address(app, f"203.0.113.{i}"), "bob", "guess").status_code)
    assert statuses[:10] == [400] * 10  # login_name_attempts
    assert 429 in statuses[10:]
    spaced = login(from_address(app, "203.0.113.99"), "bob", PASSWORD)
    assert spaced.status_code == 429 and int(spaced.headers["retry-after"]) <= 61  # login_max_delay_s
    fresh_browser_at_home = from_address(app, "192.0.2.10")  # no device cookie, but a known address
    assert login(fresh_browser_at_home, "bob").status_code == 303


def test_a_forged_device_cookie_is_ignored(app: FastAPI) -> None:
    attacker = from_address(app, "198.51.100.1", cookies={"dialoop_device": "eyJ4Ijox.forged"})
    for _ in range(5):
        assert login(attacker, "tess", "guess").status_code == 400
    assert login(attacker, "tess", PASSWORD).status_code == 429


def test_with_redis_a_logout_is_honoured_by_another_process(app: FastAPI, tiny_model_dir: Path) -> None:
    import redis

    url = "redis://127.0.0.1:6379/14"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).flushdb()
    except redis.RedisError:
        pytest.skip("no Redis answers at 127.0.0.1:6379")
    configure_auth(app, WebSettings(secret_key="test-signing-key"), redis_url=url)
    other = restarted(app, tiny_model_dir)
    configure_auth(other, WebSettings(secret_key="test-signing-key"), redis_url=url)
    with session_scope(app.state.engine) as session:
        in_the_store = session.query(RevokedSession).count()
    try:
        one = TestClient(app, follow_redirects=False)
        assert login(one, "alice").status_code == 303
        copied = one.cookies[SESSION_COOKIE]
        csrf = token(one.get("/chat", headers=HTML))
        assert one.post("/logout", data={"csrf_token": csrf}).status_code == 303
        assert (
            TestClient(other, cookies={SESSION_COOKIE: copied}).get("/api/chat/conversations").status_code
            == 401
        )
        with session_scope(app.state.engine) as session:
            assert session.query(RevokedSession).count() == in_the_store  # kept in Redis, not in the store
    finally:
        redis.Redis.from_url(url).flushdb()
