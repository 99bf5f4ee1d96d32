"""Helpers for the trainer workspace's tests: a server serving a registered policy version, two trainers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from webclient import ACCOUNTS, PASSWORD, Live, WebClient

from dialoop.serve.app import create_app, serve_in_background
from dialoop.serve.sessions import configure_auth
from dialoop.serve.trainer.common import configure_trainer
from dialoop.settings import ServeSettings, TrainerSettings, WebSettings
from dialoop.store import session_scope
from dialoop.store.accounts import create_user
from dialoop.store.migrate import open_store
from dialoop.store.registry import register_model_version

# the accounts of webclient plus two more trainers, so that every task has others to rank it
TRAINER_ACCOUNTS = {**ACCOUNTS, "tom": "trainer", "tina": "trainer"}
VERSION = "tiny-v1"  # the served policy version: what its replies and suggestions are credited to


def make_trainer_app(
    database_url: str, model_dir: Path, *, trainer: TrainerSettings | None = None, **serve: Any
) -> FastAPI:
    """The server app on `database_url` serving `model_dir` registered as version VERSION."""
    engine = open_store(database_url)
    with session_scope(engine) as session:
        register_model_version(session, name=VERSION, kind="policy", path=model_dir)
    engine.dispose()
    serve.setdefault("default_max_tokens", 12)  # short chat replies: the tests are about the workflow
    app = create_app(database_url=database_url, model=VERSION, serve_settings=ServeSettings(**serve))
    configure_auth(app, WebSettings(secret_key="test-signing-key"))
    configure_trainer(
        app, trainer or TrainerSettings(k=4, overlap=2, tasks_per_refill=2, suggestion_max_tokens=12)
    )
    with session_scope(app.state.engine) as session:
        for name, role in TRAINER_ACCOUNTS.items():
            create_user(session, name, role, PASSWORD)
    return app


@contextmanager
def live_trainer_server(database_url: str, model_dir: Path, **kwargs: Any) -> Iterator[Live]:
    app = make_trainer_app(database_url, model_dir, **kwargs)
    with serve_in_background(app) as url:
        yield Live(url, app)


def chat_once(client: WebClient, text: str, max_tokens: int = 8) -> dict[str, Any]:
    """A new chat of the client's user with one exchange with the served model: the saved reply."""
    conversation = client.api("POST", "/api/chat/conversations", {}).json()
    status, events = client.stream(
        f"/api/chat/conversations/{conversation['id']}/messages",
        {"content": text, "parent_id": None, "max_tokens": max_tokens, "temperature": 1.0},
    )
    assert status == 200, events
    done = [e for e in events if e["type"] == "done"]
    assert done and done[0]["message"], events
    reply: dict[str, Any] = done[0]["message"]
    return reply
