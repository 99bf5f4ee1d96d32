"""`dialoop bench web`: many simulated trainers and users against `dialoop serve --workers N`.

    result = bench_web(users=500, duration_s=60, workers=2)     # a fresh PostgreSQL database, a tiny model

Each simulated person logs in once, then until the time is up opens pages and works: a user chats (a new
conversation, a short streamed reply, the list of chats); a trainer also writes and submits a
demonstration and ranks the comparison task the server hands out. Reported: requests and p50/p95 latency
per route template, the statuses seen, errors (any status >= 400 other than 429, and transport errors;
target 0), and every write the server acknowledged (a 2xx with the new row's id) looked up in the store
afterwards (target: all found).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, select, text

from dialoop.store.accounts import hash_password
from dialoop.store.db import make_engine, session_scope
from dialoop.store.migrate import upgrade
from dialoop.store.models import Conversation, Message, Ranking, User

PASSWORD = "bench password"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
_META = re.compile(r'<meta name="csrf-token" content="([^"]*)">')
_ID = re.compile(r"\d+")


def _route_of(method: str, path: str) -> str:
    """A path as its route template's shape: numbers become {id} (what /metrics would call it)."""
    return f"{method} " + "/".join("{id}" if _ID.fullmatch(part) else part for part in path.split("/"))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


@dataclass
class Tally:
    """What every simulated person saw: latencies and statuses by route, errors, acknowledged writes."""

    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    errors: list[str] = field(default_factory=list)
    acknowledged: dict[str, set[Any]] = field(
        default_factory=lambda: defaultdict(set)
    )  # ids; rankings: (task, name)

    def record(self, route: str, status: int | str, seconds: float) -> None:
        self.latency[route].append(seconds)
        self.statuses[route][str(status)] += 1
        failed = not isinstance(status, int) or (status >= 400 and status != 429)
        if failed and len(self.errors) < 50:
            self.errors.append(f"{route} -> {status}")


class Person:
    """One simulated browser: a cookie jar, the page's CSRF token, and what it did."""

    def __init__(self, http: httpx.AsyncClient, tally: Tally, name: str, trainer: bool) -> None:
        self.http = http
        self.tally = tally
        self.name = name
        self.trainer = trainer
        self.csrf = ""

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        form: dict[str, str] | None = None,
        page: bool = False,
    ) -> httpx.Response | None:
        headers = {"Accept": "text/html" if page else "application/json"}
        if method != "GET" and form is None:
            headers["X-CSRF-Token"] = self.csrf
        started = time.perf_counter()
        route = _route_of(method, path)
        try:
            response = await self.http.request(method, path, json=json_body, data=form, headers=headers)
        except httpx.HTTPError as exc:
            self.tally.record(route, type(exc).__name__, time.perf_counter() - started)
            return None
        self.tally.record(route, response.status_code, time.perf_counter() - started)
        if page and response.status_code == 200:
            found = _META.search(response.text)
            if found:
                self.csrf = found.group(1)
        return response if response.status_code < 400 else None

    async def stream(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """POST a streamed reply and read it to the end: the `done` event's message, if any."""
        route = _route_of("POST", path)
        started = time.perf_counter()
        last: dict[str, Any] | None = None
        try:
            async with self.http.stream(
                "POST", path, json=body, headers={"X-CSRF-Token": self.csrf, "Accept": "text/event-stream"}
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        last = json.loads(line[5:])
                status: int | str = response.status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        self.tally.record(route, status, time.perf_counter() - started)
        if last is not None and last.get("type") == "error":
            self.tally.errors.append(f"{route} -> stream error: {last.get('message')}")
        return last.get("message") if last is not None and last.get("type") == "done" else None

    async def login(self) -> bool:
        await self.call("GET", "/login", page=True)
        response = await self.call(
            "POST",
            "/login",
            form={"name": self.name, "password": PASSWORD, "next": "/chat", "csrf_token": self.csrf},
        )
        return response is not None and (await self.call("GET", "/chat", page=True)) is not None

    async def chat(self) -> None:
        created = await self.call("POST", "/api/chat/conversations", json_body={"title": "bench"})
        if created is None:
            return
        cid = created.json()["id"]
        self.tally.acknowledged["conversations"].add(cid)
        reply = await self.stream(
            f"/api/chat/conversations/{cid}/messages",
            {"parent_id": None, "content": "Hello, how are you?", "max_tokens": 8, "temperature": 1.0},
        )
        if reply is not None:
            self.tally.acknowledged["messages"].add(reply["id"])
        await self.call("GET", "/api/chat/conversations")

    async def demonstrate(self) -> None:
        await self.call("GET", "/trainer/demonstrations", page=True)
        created = await self.call("POST", "/api/trainer/demonstrations", json_body={"title": "bench demo"})
        if created is None:
            return
        did = created.json()["id"]
        for role, content in (("user", "What is 2 + 2?"), ("assistant", "2 + 2 is 4.")):
            if (
                await self.call(
                    "POST",
                    f"/api/trainer/demonstrations/{did}/turns",
                    json_body={"role": role, "content": content},
                )
                is None
            ):
                return
        if await self.call("POST", f"/api/trainer/demonstrations/{did}/submit") is not None:
            self.tally.acknowledged["demonstrations"].add(did)

    async def rank(self) -> None:
        await self.call("GET", "/trainer/rank", page=True)
        found = await self.call("POST", "/api/trainer/tasks/next")
        task = found.json().get("task") if found is not None else None
        if not task:
            return
        order = [c["index"] for c in task["candidates"]]
        random.shuffle(order)
        ranked = await self.call(
            "POST", f"/api/trainer/tasks/{task['id']}/ranking", json_body={"order": order}
        )
        if ranked is not None:
            self.tally.acknowledged["rankings"].add((task["id"], self.name))

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            action = random.random()
            if action < 0.3:
                await self.call("GET", "/chat", page=True)
            elif action < 0.6 or not self.trainer:
                await self.chat()
            elif action < 0.8:
                await self.demonstrate()
            else:
                await self.rank()
            await asyncio.sleep(random.uniform(0.2, 1.0))  # a person reads before the next click


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _seed(database_url: str, people: int, run_id: str) -> list[tuple[str, bool]]:
    """`people` accounts (every other one a trainer) sharing one password hash (hashing is slow)."""
    engine = make_engine(database_url)
    hashed = hash_password(PASSWORD)
    accounts = [(f"bench-{run_id}-{i}", i % 2 == 0) for i in range(people)]
    with session_scope(engine) as session:
        for name, trainer in accounts:
            session.add(User(name=name, role="trainer" if trainer else "user", password_hash=hashed))
    engine.dispose()
    return accounts


def _found(database_url: str, acknowledged: dict[str, set[Any]]) -> dict[str, int]:
    engine = make_engine(database_url)
    columns = {"conversations": Conversation.id, "messages": Message.id, "demonstrations": Conversation.id}
    found: dict[str, int] = {}
    with session_scope(engine) as session:
        for kind, ids in acknowledged.items():
            if kind == "rankings":
                rows = session.execute(
                    select(Ranking.task_id, User.name).join(User, Ranking.trainer_id == User.id)
                )
                found[kind] = len(ids & {(task_id, name) for task_id, name in rows})
                continue
            column = columns[kind]
            count = 0
            for chunk in [sorted(ids)[i : i + 500] for i in range(0, len(ids), 500)]:
                count += len(list(session.scalars(select(column).where(column.in_(chunk)))))
            found[kind] = count
    engine.dispose()
    return found


def _fresh_postgres(admin_url: str) -> tuple[str, str]:
    """A new empty database on the server of `admin_url`: (its URL, its name)."""
    name = f"dialoop_bench_web_{uuid.uuid4().hex[:8]}"
    admin = create_engine(
        admin_url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}", name


def _drop_postgres(admin_url: str, name: str) -> None:
    admin = create_engine(
        admin_url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


async def _simulate(
    url: str, accounts: list[tuple[str, bool]], duration_s: float
) -> tuple[Tally, float, int]:
    """(what was seen, seconds until everyone had logged in, how many did)."""
    tally = Tally()
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=2)
    clients = [httpx.AsyncClient(base_url=url, timeout=300, limits=limits) for _ in accounts]
    try:
        people = [
            Person(c, tally, name, trainer) for c, (name, trainer) in zip(clients, accounts, strict=True)
        ]
        # everyone logs in at once (each login verifies an argon2 hash: the costliest request), then works
        started = time.monotonic()
        logged_in = await asyncio.gather(*(p.login() for p in people))
        login_s = time.monotonic() - started
        until = time.monotonic() + duration_s
        await asyncio.gather(*(p.run(until) for p, ok in zip(people, logged_in, strict=True) if ok))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return tally, login_s, sum(logged_in)


def bench_web(
    *,
    users: int = 500,
    duration_s: float = 60.0,
    workers: int = 2,
    database_url: str | None = None,
    postgres_url: str = DEFAULT_POSTGRES,
    model: str | None = None,
) -> dict[str, Any]:
    """Run the simulation against a `dialoop serve --workers` started here; the figures as a dict.

    Without `database_url` the store is a new database on the PostgreSQL server of `postgres_url`, dropped
    afterwards; without `model` a tiny random model is made."""
    if users < 1 or duration_s <= 0 or workers < 1:
        raise ValueError("--users, --duration and --workers must be positive")
    run_id = uuid.uuid4().hex[:6]
    created_db = None
    if database_url is None:
        database_url, created_db = _fresh_postgres(postgres_url)
    scratch = Path(tempfile.mkdtemp(prefix="dialoop-bench-web-"))
    try:
        if model is None:
            from dialoop.modeling.tiny import make_tiny_model

            model = str(make_tiny_model(scratch / "tiny"))
        upgrade(database_url)
        accounts = _seed(database_url, users, run_id)
        port = _free_port()
        env = {
            **os.environ,
            "DIALOOP_HOME": str(scratch / "home"),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
        log_path = scratch / "serve.log"
        command = [
            sys.executable,
            "-m",
            "dialoop.cli",
            "serve",
            "--model",
            model,
            "--database-url",
            database_url,
        ]
        command += ["--port", str(port), "--workers", str(workers), "--log-level", "warning"]
        with log_path.open("wb") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, server, log_path)
            started = time.monotonic()
            tally, login_s, logged_in = asyncio.run(_simulate(url, accounts, duration_s))
            elapsed = time.monotonic() - started
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
        found = _found(database_url, tally.acknowledged)
    finally:
        if created_db is not None:
            _drop_postgres(postgres_url, created_db)
        shutil.rmtree(scratch / "tiny", ignore_errors=True)
    routes = {
        route: {
            "requests": len(times),
            "p50_ms": round(_percentile(times, 0.5) * 1000, 1),
            "p95_ms": round(_percentile(times, 0.95) * 1000, 1),
            "statuses": dict(tally.statuses[route]),
        }
        for route, times in sorted(tally.latency.items())
    }
    statuses = [(s, n) for r in tally.statuses.values() for s, n in r.items()]
    errors = sum(n for s, n in statuses if not s.isdigit() or (int(s) >= 400 and s != "429"))
    acknowledged = {kind: len(ids) for kind, ids in tally.acknowledged.items()}
    if errors == 0:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "benchmark": "web",
        "users": users,
        "trainers": sum(1 for _, t in accounts if t),
        "duration_s": duration_s,
        "elapsed_s": round(elapsed, 1),
        "login_phase_s": round(login_s, 1),
        "logged_in": logged_in,
        "workers": workers,
        "store": "postgresql" if database_url.startswith("postgresql") else database_url.split(":", 1)[0],
        "requests": sum(n for _, n in statuses),
        "requests_per_s": round(sum(n for _, n in statuses) / elapsed, 1),
        "machine_load_1m": round(os.getloadavg()[0], 1),
        "errors_other_than_429": errors,
        "responses_429": sum(n for s, n in statuses if s == "429"),
        "errors_by_status": _errors_by_status(statuses),
        "error_samples": tally.errors[:10],
        "server_log": str(log_path) if errors else None,  # kept when there were errors
        "routes": routes,
        "writes_acknowledged": acknowledged,
        "writes_found": found,
        "writes_lost": sum(acknowledged.values()) - sum(found.values()),
        "meets_target": errors == 0 and acknowledged == found,
    }


def _errors_by_status(statuses: list[tuple[str, int]]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for status, n in statuses:
        if not status.isdigit() or (int(status) >= 400 and status != "429"):
            out[status] += n
    return dict(out)


def _wait_ready(url: str, server: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"dialoop serve exited ({server.returncode}): {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"dialoop serve was not ready in {timeout_s:.0f} s: {log_path.read_text()[-2000:]}")
