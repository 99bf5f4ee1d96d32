"""The pages' shell: security headers, no inline script or style anywhere, static files, error pages."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from webclient import PASSWORD, make_web_app

from dialoop.serve.pages import STATIC_DIR

HTML = {"Accept": "text/html"}


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    return make_web_app(f"sqlite:///{tmp_path_factory.mktemp('pages') / 'store.db'}", tiny_model_dir)


def logged_in(app: FastAPI, name: str = "alice") -> TestClient:
    client = TestClient(app, follow_redirects=False)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/login").text)
    assert csrf
    response = client.post("/login", data={"name": name, "password": PASSWORD, "csrf_token": csrf.group(1)})
    assert response.status_code == 303
    return client


class InlineCode(HTMLParser):
    """Collects what a strict CSP would refuse: inline scripts, event-handler and style attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "script":
            if not names.get("src"):
                self.problems.append("inline <script>")
            self.scripts.append(names.get("src") or "")
        if tag == "style":
            self.problems.append("<style> element")
        self.problems += [f"{tag} {a}=" for a in names if a.startswith("on") or a == "style"]


def test_pages_carry_a_strict_csp_and_no_inline_script_or_style(app: FastAPI) -> None:
    anonymous = TestClient(app)
    client = logged_in(app)
    pages: list[httpx.Response] = [anonymous.get("/login"), client.get("/chat"), client.get("/keys")]
    for page in pages:
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert (
            page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
        )
        parser = InlineCode()
        parser.feed(page.text)
        assert parser.problems == [], page.url
        for src in parser.scripts:
            assert client.get(src).status_code == 200, src


def test_no_script_builds_html_from_strings() -> None:
    """Text reaches the page through textContent and DOM nodes only: no innerHTML and friends."""
    forbidden = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function")
    scripts = sorted(STATIC_DIR.rglob("*.js"))
    assert scripts
    for script in scripts:
        assert not forbidden.search(script.read_text()), script


def test_static_files_are_served_and_nothing_outside_them(app: FastAPI) -> None:
    client = TestClient(app)
    script = client.get("/static/js/chat.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert client.get("/static/css/app.css").headers["content-type"].startswith("text/css")
    for path in [
        "/static/../serve/auth.py",
        "/static/%2e%2e/serve/auth.py",
        "/static/js/",
        "/static/nope.js",
    ]:
        assert client.get(path).status_code == 404, path


def test_errors_of_page_visits_are_pages_and_of_calls_json(app: FastAPI) -> None:
    client = logged_in(app)
    page = client.get("/chat/999999", headers=HTML)
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert "no conversation 999999" in page.text and "content-security-policy" in page.headers
    call = client.get("/api/chat/conversations/999999")
    assert call.status_code == 404 and call.json() == {"detail": "no conversation 999999"}
    assert client.get("/", headers=HTML).headers["location"] == "/chat"
    form = client.post("/logout", data={"csrf_token": "stale"}, headers=HTML)
    assert form.status_code == 403 and form.headers["content-type"].startswith("text/html")
    assert "reload the page and try again" in form.text
