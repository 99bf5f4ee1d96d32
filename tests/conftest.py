"""Shared fixtures: stores on SQLite and PostgreSQL, tiny models, an isolated DIALOOP_HOME."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import Engine, create_engine, text

from dialoop import settings as settings_mod
from dialoop.store.db import make_engine
from dialoop.store.migrate import upgrade

torch.set_num_threads(1)

PG_ADMIN_URL = os.environ.get("DIALOOP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _pg_available() -> bool:
    try:
        eng = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with eng.connect():
            pass
        eng.dispose()
        return True
    except Exception:
        return False


PG_AVAILABLE = _pg_available()


@pytest.fixture(autouse=True)
def dialoop_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own DIALOOP_HOME, except that the converted default model is shared."""
    home = tmp_path / "dialoop-home"
    monkeypatch.setenv("DIALOOP_HOME", str(home))
    monkeypatch.delenv("DIALOOP_DATABASE_URL", raising=False)
    shared_models = os.environ.get("DIALOOP_TEST_MODELS_DIR")
    if shared_models:
        home.mkdir(parents=True, exist_ok=True)
        (home / "models").symlink_to(shared_models)
    settings_mod.configure()
    yield home
    settings_mod.configure()


class _PgTemplate:
    """One database per test session, upgraded once; each test clones it (fast) and drops its clone."""

    def __init__(self) -> None:
        self.admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        self.template = f"dialoop_tmpl_{uuid.uuid4().hex[:8]}"
        self.counter = itertools.count()
        with self.admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{self.template}"'))
        upgrade(self.url(self.template))
        make_engine(self.url(self.template)).dispose()

    def url(self, name: str) -> str:
        return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    def clone(self) -> str:
        name = f"{self.template}_{next(self.counter)}"
        with self.admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"'))
        return name

    def drop(self, name: str) -> None:
        with self.admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def close(self) -> None:
        self.drop(self.template)
        self.admin.dispose()


@pytest.fixture(scope="session")
def pg_template() -> Iterator[_PgTemplate]:
    if not PG_AVAILABLE:
        pytest.skip(f"no PostgreSQL server answers at {PG_ADMIN_URL}: PostgreSQL store tests skipped")
    tmpl = _PgTemplate()
    yield tmpl
    tmpl.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A freshly migrated, empty store: once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
        upgrade(url)
        yield url
        return
    tmpl: _PgTemplate = request.getfixturevalue("pg_template")
    name = tmpl.clone()
    yield tmpl.url(name)
    tmpl.drop(name)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite store, for tests whose subject is not the database."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (read-only: copy to modify)."""
    from dialoop.modeling.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
