"""Engines and sessions: SQLite (WAL, foreign keys) by default, PostgreSQL by URL.

The connection pool is sized from the serve settings (`db_connections`, `db_wait_s`): it holds
`db_connections` connections and as many again as overflow, and a checkout waits at most `db_wait_s`
before `sqlalchemy.exc.TimeoutError` (the server answers it 503, never a long stall).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from dialoop.settings import settings


def _pool_args(url: str, connections: int | None, wait_s: float | None) -> dict[str, Any]:
    if url.startswith("sqlite") and (url.endswith(":memory:") or url.rstrip("/") in ("sqlite:", "sqlite")):
        return {}  # one in-memory database per connection: SQLAlchemy's own pool fits it
    limits = settings().serve
    size = connections or limits.db_connections
    return {"pool_size": size, "max_overflow": size, "pool_timeout": wait_s or limits.db_wait_s}


def make_engine(url: str, *, connections: int | None = None, wait_s: float | None = None) -> Engine:
    """An engine for `url`; SQLite gets WAL and enforced foreign keys, its parent dir is created.

    `connections` and `wait_s` size the pool (default: the serve settings' `db_connections`, `db_wait_s`).
    """
    pool = _pool_args(url, connections, wait_s)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return create_engine(url, pool_pre_ping=True, **pool)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back everything on any error."""
    session = sessionmaker(engine, expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
