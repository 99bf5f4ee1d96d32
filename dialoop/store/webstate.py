"""The web server's shared state: ended sessions and login failures, in the store or in Redis.

Every server process reads and writes the same state, so a logout on one process is honoured by all and
survives a restart, and login throttling counts every process's failures:

    state = web_state(engine, redis_url=None)        # SqlWebState on the store; RedisWebState with a URL
    state.revoke_session(sid, expires_at)            # a logged-out cookie stays dead until it would expire
    state.session_revoked(sid)
    state.record_failure("alice", "ip:10.0.0.7", "10.0.0.7")
    state.login_record("alice", "ip:10.0.0.7", "10.0.0.7", window_s=300)   # counts, for the policy

The throttling policy itself (what the counts mean) is `dialoop.serve.auth`. Times are Unix seconds.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from dialoop.store.db import session_scope
from dialoop.store.models import KnownLogin, LoginFailure, RevokedSession

KNOWN_LOGIN_DAYS = 90  # an address a user logged in from stays "known" this long after the last login


@dataclass(frozen=True)
class LoginRecord:
    """Failed logins within the window: for this name and client, this address, this name (any client)."""

    pair: int = 0
    pair_oldest: float | None = None
    ip: int = 0
    ip_oldest: float | None = None
    name: int = 0
    name_latest: float | None = None
    known_ip: bool = False  # the user has logged in from this address before


class WebState(Protocol):
    def revoke_session(self, sid: str, expires_at: float) -> None: ...

    def session_revoked(self, sid: str) -> bool: ...

    def login_record(self, name: str, client: str, ip: str, window_s: float) -> LoginRecord: ...

    def record_failure(self, name: str, client: str, ip: str) -> None: ...

    def record_success(self, name: str, client: str, ip: str) -> None: ...


def _to_dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)


def _to_ts(value: datetime | None) -> float | None:
    return value.replace(tzinfo=UTC).timestamp() if value is not None else None


class SqlWebState:
    """The state in the store's tables `revoked_sessions`, `login_failures` and `known_logins`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def revoke_session(self, sid: str, expires_at: float) -> None:
        with session_scope(self.engine) as session:
            dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
            session.execute(
                dialect.insert(RevokedSession)
                .values(sid=sid, expires_at=_to_dt(expires_at))
                .on_conflict_do_nothing()
            )
            session.execute(delete(RevokedSession).where(RevokedSession.expires_at < _to_dt(time.time())))

    def session_revoked(self, sid: str) -> bool:
        with self.engine.connect() as connection:
            found = connection.execute(select(RevokedSession.sid).where(RevokedSession.sid == sid)).first()
        return found is not None

    def login_record(self, name: str, client: str, ip: str, window_s: float) -> LoginRecord:
        since = _to_dt(time.time() - window_s)
        recent = LoginFailure.at >= since
        with self.engine.connect() as connection:
            pair, pair_oldest = connection.execute(
                select(func.count(), func.min(LoginFailure.at)).where(
                    recent, LoginFailure.name == name, LoginFailure.client == client
                )
            ).one()
            by_ip, ip_oldest = connection.execute(
                select(func.count(), func.min(LoginFailure.at)).where(recent, LoginFailure.ip == ip)
            ).one()
            by_name, name_latest = connection.execute(
                select(func.count(), func.max(LoginFailure.at)).where(recent, LoginFailure.name == name)
            ).one()
            known = connection.execute(
                select(KnownLogin.last_at).where(KnownLogin.name == name, KnownLogin.ip == ip)
            ).scalar()
        return LoginRecord(
            pair=pair,
            pair_oldest=_to_ts(pair_oldest),
            ip=by_ip,
            ip_oldest=_to_ts(ip_oldest),
            name=by_name,
            name_latest=_to_ts(name_latest),
            known_ip=known is not None and time.time() - (_to_ts(known) or 0) < KNOWN_LOGIN_DAYS * 86400,
        )

    def record_failure(self, name: str, client: str, ip: str) -> None:
        now = time.time()
        with session_scope(self.engine) as session:
            session.add(LoginFailure(name=name, client=client, ip=ip, at=_to_dt(now)))
            # failures older than a day count for nothing: keep the table small
            session.execute(delete(LoginFailure).where(LoginFailure.at < _to_dt(now - 86400)))

    def record_success(self, name: str, client: str, ip: str) -> None:
        with session_scope(self.engine) as session:
            # the pair is forgiven; the failures still count for the address and the name
            session.execute(
                update(LoginFailure)
                .where(LoginFailure.name == name, LoginFailure.client == client)
                .values(client="forgiven")
            )
            dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
            now = _to_dt(time.time())
            session.execute(
                dialect.insert(KnownLogin)
                .values(name=name, ip=ip, last_at=now)
                .on_conflict_do_update(index_elements=["name", "ip"], set_={"last_at": now})
            )


class RedisWebState:
    """The state in Redis (`DIALOOP_REDIS_URL`): keys under `dialoop:`, each expiring with what it holds."""

    def __init__(self, url: str) -> None:
        import redis

        self.redis: Any = redis.Redis.from_url(url, decode_responses=True)

    def revoke_session(self, sid: str, expires_at: float) -> None:
        ttl = max(1, int(expires_at - time.time()) + 1)
        self.redis.set(f"dialoop:revoked:{sid}", "1", ex=ttl)

    def session_revoked(self, sid: str) -> bool:
        return bool(self.redis.exists(f"dialoop:revoked:{sid}"))

    @staticmethod
    def _keys(name: str, client: str, ip: str) -> tuple[str, str, str]:
        return f"dialoop:fail:pair:{name}|{client}", f"dialoop:fail:ip:{ip}", f"dialoop:fail:name:{name}"

    def login_record(self, name: str, client: str, ip: str, window_s: float) -> LoginRecord:
        since = time.time() - window_s
        pipe = self.redis.pipeline()
        for key in self._keys(name, client, ip):
            pipe.zremrangebyscore(key, "-inf", since)
            pipe.zcard(key)
            pipe.zrange(key, 0, 0, withscores=True)
            pipe.zrange(key, -1, -1, withscores=True)
        pipe.exists(f"dialoop:known:{name}|{ip}")
        out = pipe.execute()
        (pair, pair_first), (by_ip, ip_first), (by_name, name_last) = (
            (out[1], out[2]),
            (out[5], out[6]),
            (out[9], out[11]),
        )
        return LoginRecord(
            pair=pair,
            pair_oldest=pair_first[0][1] if pair_first else None,
            ip=by_ip,
            ip_oldest=ip_first[0][1] if ip_first else None,
            name=by_name,
            name_latest=name_last[0][1] if name_last else None,
            known_ip=bool(out[12]),
        )

    def record_failure(self, name: str, client: str, ip: str) -> None:
        now = time.time()
        pipe = self.redis.pipeline()
        for key in self._keys(name, client, ip):
            pipe.zadd(key, {uuid.uuid4().hex: now})
            pipe.expire(key, 86400)
        pipe.execute()

    def record_success(self, name: str, client: str, ip: str) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(self._keys(name, client, ip)[0])
        pipe.set(f"dialoop:known:{name}|{ip}", "1", ex=KNOWN_LOGIN_DAYS * 86400)
        pipe.execute()


def web_state(engine: Engine, redis_url: str | None = None) -> WebState:
    """The shared state: in Redis when `redis_url` is given, else in the store of `engine`."""
    return RedisWebState(redis_url) if redis_url else SqlWebState(engine)
