"""Helpers for the web tests: a live server with one account per role, and a cookie-keeping client."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from dialoop.serve.app import create_app, serve_in_background
from dialoop.serve.sessions import configure_auth
from dialoop.serve.worker import GenerationWorker
from dialoop.settings import ServeSettings, WebSettings
from dialoop.store import session_scope
from dialoop.store.accounts import create_user

PASSWORD = "correct horse battery"
# name -> role: one account per role, and a second plain user to play "another user"
ACCOUNTS = {"root": "admin", "tess": "trainer", "alice": "user", "bob": "user"}
_META = re.compile(r'<meta name="csrf-token" content="([^"]*)">')


def make_web_app(database_url: str, model: Path, **serve: Any) -> FastAPI:
    """The server app on `database_url` serving `model` as `tiny`, with the accounts of ACCOUNTS."""
    app = create_app(
        database_url=database_url, model=model, model_name="tiny", serve_settings=ServeSettings(**serve)
    )
    configure_auth(app, WebSettings(secret_key="test-signing-key"))
    with session_scope(app.state.engine) as session:
        for name, role in ACCOUNTS.items():
            create_user(session, name, role, PASSWORD)
    return app


@dataclass
class Live:
    url: str
    app: FastAPI

    @property
    def worker(self) -> GenerationWorker:
        worker: GenerationWorker = self.app.state.worker
        return worker

    def client(self, name: str | None = None) -> WebClient:
        """A browser-like client, logged in as `name` (None: anonymous)."""
        client = WebClient(httpx.Client(base_url=self.url, timeout=60))
        if name is not None:
            client.login(name)
        return client


@contextmanager
def live_web_server(database_url: str, model: Path, **serve: Any) -> Iterator[Live]:
    app = make_web_app(database_url, model, **serve)
    with serve_in_background(app) as url:
        yield Live(url, app)


class WebClient:
    """Keeps the session cookie and the page's CSRF token, like a browser tab."""

    def __init__(self, http: httpx.Client):
        self.http = http
        self.csrf = ""

    def page(self, path: str) -> httpx.Response:
        """GET a page as a browser does (Accept: text/html); remembers its CSRF token."""
        response = self.http.get(path, headers={"Accept": "text/html"})
        found = _META.search(response.text)
        if found:
            self.csrf = found.group(1)
        return response

    def login(self, name: str, password: str = PASSWORD, next: str = "/chat") -> httpx.Response:
        self.page("/login")
        response = self.http.post(
            "/login", data={"name": name, "password": password, "next": next, "csrf_token": self.csrf}
        )
        if response.status_code == 303:
            self.page("/chat")  # the session changed at login: so did the token
        return response

    def api(self, method: str, path: str, body: Any = None, *, csrf: bool = True) -> httpx.Response:
        headers = {"Accept": "application/json"}
        if csrf:
            headers["X-CSRF-Token"] = self.csrf
        return self.http.request(method, path, json=body, headers=headers)

    def stream(self, path: str, body: Any) -> tuple[int, list[dict[str, Any]]]:
        """POST and read the whole event stream: (status, events)."""
        events: list[dict[str, Any]] = []
        with self.http.stream("POST", path, json=body, headers={"X-CSRF-Token": self.csrf}) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
            if response.status_code != 200:
                response.read()
            return response.status_code, events
