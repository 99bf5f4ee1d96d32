"""Body limits over real HTTP: counted on the bytes received (chunked bodies, lying Content-Length
headers), per route family (/v1 larger than the web routes), answered 413 in the family's error shape
with the limit in the message, nothing of a refused body stored."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import func, select
from webclient import Live, WebClient, live_web_server

from dialoop.store import Conversation, session_scope
from dialoop.store.accounts import create_api_key, get_user

WEB_LIMIT = 10_000
V1_LIMIT = 40_000


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    db = tmp_path_factory.mktemp("limits") / "store.db"
    with live_web_server(
        f"sqlite:///{db}", tiny_model_dir, max_web_body_bytes=WEB_LIMIT, max_body_bytes=V1_LIMIT
    ) as live:
        yield live


@pytest.fixture(scope="module")
def alice(server: Live) -> WebClient:
    return server.client("alice")


@pytest.fixture(scope="module")
def api_key(server: Live) -> str:
    with session_scope(server.app.state.engine) as session:
        user = get_user(session, "alice")
        assert user is not None
        _, key = create_api_key(session, user)
    return key


def chunks(total: int, size: int = 4096) -> Iterator[bytes]:
    """A JSON body of about `total` bytes, sent without Content-Length (chunked)."""
    yield b'{"title": "'
    for _ in range(total // size):
        yield b"x" * size
    yield b'"}'


def conversations(server: Live) -> int:
    with session_scope(server.app.state.engine) as session:
        return int(session.scalar(select(func.count()).select_from(Conversation)) or 0)


def raw_request(server: Live, head: str, body: bytes) -> bytes:
    """Send `head` and `body` as they are (a lying header), return what the server answers."""
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        received = b""
        while b"\r\n\r\n" not in received or len(received) < 12:
            data = sock.recv(65536)
            if not data:
                break
            received += data
        return received


def web_headers(client: WebClient) -> dict[str, str]:
    return {"X-CSRF-Token": client.csrf, "Content-Type": "application/json", "Accept": "application/json"}


def test_a_chunked_web_body_past_the_limit_is_413_and_nothing_is_stored(
    server: Live, alice: WebClient
) -> None:
    before = conversations(server)
    answer = alice.http.post(
        "/api/chat/conversations", content=chunks(WEB_LIMIT * 20), headers=web_headers(alice)
    )
    assert answer.status_code == 413, answer.text
    assert answer.json() == {
        "detail": f"The request body is larger than {WEB_LIMIT} bytes, the most this route accepts."
    }
    assert conversations(server) == before
    # a body under the limit, chunked too, is served
    small = alice.http.post("/api/chat/conversations", content=chunks(1000), headers=web_headers(alice))
    assert small.status_code == 201, small.text
    assert conversations(server) == before + 1


def test_a_chunked_v1_body_past_its_limit_is_413_in_openai_shape(server: Live, api_key: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    body = chunks(V1_LIMIT * 5)
    answer = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers, timeout=60)
    assert answer.status_code == 413, answer.text
    error = answer.json()["error"]
    assert error["code"] == "request_too_large" and str(V1_LIMIT) in error["message"]


def test_v1_accepts_a_body_larger_than_the_web_limit(server: Live, api_key: str) -> None:
    """Per-route sizes: 20 KB is past the web routes' limit but within /v1's."""
    content = "word " * 4000
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    assert WEB_LIMIT < len(json.dumps(body)) < V1_LIMIT
    headers = {"Authorization": f"Bearer {api_key}"}
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert answer.status_code != 413, answer.text
    assert answer.status_code in (200, 400), answer.text  # 400: longer than the tiny model's context


def test_a_form_post_past_the_limit_is_413(server: Live) -> None:
    login = httpx.post(
        f"{server.url}/login",
        content=(b"name=alice&password=" + b"p" * WEB_LIMIT * 3),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert login.status_code == 413


def test_a_content_length_larger_than_the_limit_is_refused_before_the_body_arrives(
    server: Live, alice: WebClient
) -> None:
    cookie = "; ".join(f"{k}={v}" for k, v in alice.http.cookies.items())
    head = (
        "POST /api/chat/conversations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"X-CSRF-Token: {alice.csrf}\r\nCookie: {cookie}\r\nContent-Length: 10000000000\r\n\r\n"
    )
    answer = raw_request(server, head, b'{"title": "lie"}')
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_content_length_smaller_than_the_body_stores_nothing_past_it(
    server: Live, alice: WebClient
) -> None:
    cookie = "; ".join(f"{k}={v}" for k, v in alice.http.cookies.items())
    body = json.dumps({"title": "t" * 200}).encode()
    head = (
        "POST /api/chat/conversations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"X-CSRF-Token: {alice.csrf}\r\nCookie: {cookie}\r\nContent-Length: 20\r\n\r\n"
    )
    before = conversations(server)
    answer = raw_request(server, head, body)
    assert answer.startswith(b"HTTP/1.1 422"), answer[:200]  # the first 20 bytes are not a JSON document
    assert conversations(server) == before
