"""Shared fixtures: SQLite and PostgreSQL stores, tiny models, an isolated DIALOOP_HOME, accelerate launch."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import Engine, create_engine, text

from dialoop import settings as settings_mod
from dialoop.store.db import make_engine
from dialoop.store.migrate import upgrade
from dialoop.store.models import Base

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


class _PgDatabase:
    """One fresh database per test session; each test gets it migrated and leaves it truncated."""

    def __init__(self) -> None:
        self.admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        self.name = f"dialoop_test_{uuid.uuid4().hex[:8]}"
        with self.admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{self.name}"
        self.engine = create_engine(self.url)

    def reset(self) -> None:
        """Bring the schema to head (a test may have downgraded it) and empty every table."""
        upgrade(self.url)
        tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        with self.engine.begin() as c:
            c.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))

    def close(self) -> None:
        self.engine.dispose()
        with self.admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[_PgDatabase]:
    if not PG_AVAILABLE:
        pytest.skip(f"no PostgreSQL server answers at {PG_ADMIN_URL}: PostgreSQL store tests skipped")
    db = _PgDatabase()
    yield db
    db.close()


@pytest.fixture(scope="session")
def pg_database_2() -> Iterator[_PgDatabase]:
    if not PG_AVAILABLE:
        pytest.skip(f"no PostgreSQL server answers at {PG_ADMIN_URL}: PostgreSQL store tests skipped")
    db = _PgDatabase()
    yield db
    db.close()


@pytest.fixture
def second_db_url(db_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Another empty store of the same kind as `db_url`'s (e.g. to import an export into)."""
    if db_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'second.db'}"
        upgrade(url)
        return url
    db: _PgDatabase = request.getfixturevalue("pg_database_2")
    db.reset()
    return db.url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A freshly migrated, empty store: once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
        upgrade(url)
        yield url
        return
    db: _PgDatabase = request.getfixturevalue("pg_database")
    db.reset()
    yield db.url


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


@pytest.fixture(scope="session")
def tiny_rm_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model with a random head on the tiny model (PPO's tests)."""
    from dialoop.modeling.heads import reward_model_from_lm
    from dialoop.modeling.loading import load_tokenizer, save_model_dir

    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_model_dir)
    rm = reward_model_from_lm(tiny_model_dir, device="cpu", tokenizer=tokenizer)
    return save_model_dir(rm, tokenizer, tmp_path_factory.mktemp("rm") / "model")


class AccelerateLaunch:
    """`accelerate launch` of CPU processes over gloo, one torch thread each (they share the machine's cores).

    `strategy` is accelerate's flags for DDP (the default), FSDP or DeepSpeed; `script` runs a file instead
    of `python -m dialoop.cli train`. `env` is the environment of the launch, for single-process runs to
    match.
    """

    def __init__(self) -> None:
        self.env = dict(os.environ)
        cpu_only = {"ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
        self.env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **cpu_only)

    def __call__(
        self,
        args: list[str],
        *,
        strategy: tuple[str, ...] = ("--multi_gpu",),
        num_processes: int = 2,
        script: Path | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", *strategy]
        cmd += ["--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no"]
        cmd += ["--dynamo_backend", "no", "--main_process_port", "0"]
        cmd += [str(script)] if script is not None else ["-m", "dialoop.cli", "train"]
        return subprocess.run(cmd + args, env=self.env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def accelerate_launch() -> AccelerateLaunch:
    """Runs `accelerate launch ... -m dialoop.cli train ARGS` on 2 CPU processes by default."""
    return AccelerateLaunch()
