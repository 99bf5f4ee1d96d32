"""Back-pressure for database work: a request waits a bounded time for a database slot, then gets 503.

FastAPI runs sync dependencies and routes on AnyIO's worker threads. A request holds its connection from
its session dependency to the end of its route, and may wait for a thread in between; with fewer
connections than threads, the threads can all block on an empty pool while the requests holding the
connections wait for a thread: every request stalls until the pool's timeout, then fails.

One setting, `ServeSettings.db_connections` (N), sizes the three together:
- a request takes one of N slots (an async semaphore, no thread held while waiting) before its session
  opens, and gives it back when its route returns; a request that waits longer than `db_wait_s` gets 503
  with `Retry-After`;
- the connection pool holds N connections plus N of overflow (`dialoop.store.db.make_engine`), so the slot
  holders always find one, with room for work outside requests (the worker, the jobs, streams);
- AnyIO's thread limiter has room for every connection the pool lends, plus a few for sync routes that use
  no database.

A pool checkout that still times out (`sqlalchemy.exc.TimeoutError`) is answered 503 the same way.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import anyio
import anyio.to_thread
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from dialoop.serve.openai_errors import OpenAIError, is_v1
from dialoop.settings import ServeSettings

T = TypeVar("T")

SPARE_THREADS = 8  # for sync routes and dependencies that use no database


@dataclass
class DbSlots:
    """The app's database slots (see the module's doc)."""

    size: int
    wait_s: float

    def __post_init__(self) -> None:
        self.semaphore = anyio.Semaphore(self.size)

    @property
    def threads(self) -> int:
        """Worker threads the process needs: one per connection the pool lends, and spares."""
        return 2 * self.size + SPARE_THREADS

    @property
    def busy_message(self) -> str:
        return f"The server is busy: retry in {self.retry_after} s."

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil(self.wait_s))

    def busy(self) -> HTTPException:
        return HTTPException(503, self.busy_message, headers={"Retry-After": str(self.retry_after)})

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """One slot for the body of the `async with`; 503 (`busy`) when none frees within `wait_s`."""
        limiter = anyio.to_thread.current_default_thread_limiter()  # one per event loop
        if limiter.total_tokens < self.threads:
            limiter.total_tokens = self.threads
        acquired = False
        with anyio.move_on_after(self.wait_s):
            await self.semaphore.acquire()
            acquired = True
        if not acquired:
            raise self.busy()
        try:
            yield
        finally:
            self.semaphore.release()


def db_slots(request: Request) -> DbSlots:
    slots: DbSlots = request.app.state.db_slots
    return slots


async def db_slot(request: Request) -> AsyncIterator[None]:
    """Dependency: hold one database slot until the route returns (see `DbSlots.hold`)."""
    async with db_slots(request).hold():
        yield


async def run_with_db(request: Request, work: Callable[[], T]) -> T:
    """Run sync database `work` on a worker thread while holding a database slot."""
    async with db_slots(request).hold():
        return await anyio.to_thread.run_sync(work)


async def _pool_timeout(request: Request, exc: Exception) -> Response:
    slots = db_slots(request)
    headers = {"Retry-After": str(slots.retry_after)}
    if is_v1(request):
        error = OpenAIError(503, slots.busy_message, type="server_error", code="overloaded")
        return JSONResponse(error.body(), status_code=503, headers=headers)
    return JSONResponse({"detail": slots.busy_message}, status_code=503, headers=headers)


def install_overload(app: FastAPI, serve_settings: ServeSettings) -> None:
    """Database slots for `app` and 503 for a pool checkout that timed out."""
    app.state.db_slots = DbSlots(serve_settings.db_connections, serve_settings.db_wait_s)
    app.add_exception_handler(PoolTimeoutError, _pool_timeout)
