"""The web server's shared state on each backend: the store (SQLite, PostgreSQL) and Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from dialoop.store.webstate import RedisWebState, SqlWebState, WebState

REDIS_URL = "redis://127.0.0.1:6379/15"


def _redis_answers() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def redis_state() -> Iterator[RedisWebState]:
    if not _redis_answers():
        pytest.skip(f"no Redis answers at {REDIS_URL}")
    shared = RedisWebState(REDIS_URL)
    shared.redis.flushdb()
    yield shared
    shared.redis.flushdb()


def test_the_store_keeps_the_state(engine: Engine) -> None:  # SQLite and PostgreSQL
    check_revocation(SqlWebState(engine))
    check_login_failures(SqlWebState(engine))


def test_redis_keeps_the_state(redis_state: RedisWebState) -> None:
    check_revocation(redis_state)
    check_login_failures(redis_state)


def check_revocation(state: WebState) -> None:
    sid = uuid.uuid4().hex
    assert not state.session_revoked(sid)
    state.revoke_session(sid, time.time() + 3600)
    state.revoke_session(sid, time.time() + 3600)  # twice (two processes) is fine
    assert state.session_revoked(sid)
    assert not state.session_revoked(uuid.uuid4().hex)


def check_login_failures(state: WebState) -> None:
    for ip in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
        state.record_failure("alice", f"ip:{ip}", ip)
    state.record_failure("bob", "ip:10.0.0.1", "10.0.0.1")
    record = state.login_record("alice", "ip:10.0.0.1", "10.0.0.1", window_s=300)
    assert (record.pair, record.ip, record.name, record.known_ip) == (2, 3, 3, False)
    assert record.pair_oldest is not None and abs(record.pair_oldest - time.time()) < 5
    assert record.name_latest is not None and record.name_latest >= record.pair_oldest
    state.record_success("alice", "ip:10.0.0.1", "10.0.0.1")
    after = state.login_record("alice", "ip:10.0.0.1", "10.0.0.1", window_s=300)
    assert (after.pair, after.name, after.known_ip) == (0, 3, True)  # the pair is forgiven, not the rest
    assert state.login_record("alice", "ip:10.0.0.1", "10.0.0.1", window_s=0.0).ip == 0  # outside the window
