"""Prometheus metrics: `GET /metrics`, and the middleware that counts every request.

Requests are counted by method, route template (`/api/chat/conversations/{conversation_id}`, never the
raw path) and status; latency is a histogram by method and route. The generation worker's gauges (queue
depth, rows decoding, KV-cache slots) and counters (tokens generated, requests refused) are sampled from
`GenerationWorker.metrics()`. 429 and 5xx counts are `dialoop_http_requests_total{status=~"429|5.."}`.

With `dialoop serve --workers N` the processes share one metrics directory (`PROMETHEUS_MULTIPROC_DIR`,
set by the CLI) and any of them answers a scrape with the sums over all. `/metrics` needs an admin's API
key (`Authorization: Bearer dl-…`, as Prometheus' `authorization` scrape setting sends it) unless
`DIALOOP_SERVE_METRICS_PUBLIC=1`.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dialoop.serve.deps import api_admin, api_user
from dialoop.serve.logs import log_request, request_id

REQUESTS = Counter(
    "dialoop_http_requests_total",
    "HTTP requests answered, by method, route and status.",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "dialoop_http_request_duration_seconds",
    "Time from a request's arrival to its response's end (streams included), by method and route.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
QUEUE_DEPTH = Gauge(
    "dialoop_generation_queue_depth", "Replies waiting for a KV-cache slot.", multiprocess_mode="livesum"
)
ROWS_DECODING = Gauge("dialoop_generation_rows_decoding", "Rows decoding now.", multiprocess_mode="livesum")
KV_SLOTS_TOTAL = Gauge(
    "dialoop_kv_cache_slots", "KV-cache slots (rows) of the engines.", multiprocess_mode="livesum"
)
KV_SLOTS_USED = Gauge("dialoop_kv_cache_slots_used", "KV-cache slots in use.", multiprocess_mode="livesum")
TOKENS = Counter("dialoop_generated_tokens_total", "Tokens generated (rate() of it is tokens/s).")
REJECTED = Counter("dialoop_generation_rejected_total", "Generations refused because the queue was full.")

_SAMPLE_EVERY_S = 1.0


class _WorkerSampler:
    """Copies a worker's metrics() into the gauges, and its growing totals into the counters."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_at = 0.0
        self.totals = {"tokens_generated_total": 0, "requests_rejected_total": 0}

    def sample(self, worker: Any, force: bool = False) -> None:
        now = time.monotonic()
        if worker is None or (not force and now - self.last_at < _SAMPLE_EVERY_S):
            return
        with self.lock:
            self.last_at = now
            values = worker_metrics(worker)
            QUEUE_DEPTH.set(values.get("queue_depth", 0))
            ROWS_DECODING.set(values.get("rows_running", 0))
            KV_SLOTS_TOTAL.set(values.get("kv_slots_total", 0))
            KV_SLOTS_USED.set(values.get("kv_slots_used", 0))
            for key, counter in (("tokens_generated_total", TOKENS), ("requests_rejected_total", REJECTED)):
                total = int(values.get(key, 0))
                if total > self.totals[key]:
                    counter.inc(total - self.totals[key])
                self.totals[key] = total


def worker_metrics(worker: Any) -> dict[str, int]:
    """The worker's `metrics()`, or what its `stats` hold when it has none."""
    if hasattr(worker, "metrics"):
        return dict(worker.metrics())
    stats = getattr(worker, "stats", None)
    return {
        "tokens_generated_total": getattr(stats, "tokens_generated", 0),
        "requests_rejected_total": getattr(stats, "rejected", 0),
    }


def _sampler(app: Any) -> _WorkerSampler:
    sampler: _WorkerSampler | None = getattr(app.state, "metrics_sampler", None)
    if sampler is None:
        sampler = app.state.metrics_sampler = _WorkerSampler()
    return sampler


class RequestObserver:
    """ASGI middleware: counts and times each HTTP request, gives it a request id (`X-Request-ID`), and
    writes one access-log line for it (`dialoop.serve.logs`)."""

    def __init__(self, app: ASGIApp, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        rid = request_id(headers.get(b"x-request-id", b"").decode("latin-1") or None)
        scope.setdefault("state", {})["request_id"] = rid
        status = 500  # what the client sees when the app fails before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(duration)
            app = scope.get("app")
            if app is not None:
                _sampler(app).sample(getattr(app.state, "worker", None))
            if self.access_log:
                client = scope.get("client")
                log_request(
                    method=method,
                    route=route,
                    path=scope.get("path", ""),
                    status=status,
                    duration_s=duration,
                    request_id=rid,
                    client=client[0] if client else "",
                )


router = APIRouter(include_in_schema=False)


async def _metrics_access(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Anyone when the serve setting `metrics_public` is on, else an admin's API key (401/403 otherwise)."""
    if not request.app.state.serve_settings.metrics_public:
        api_admin(await api_user(request, authorization))


@router.get("/metrics", dependencies=[Depends(_metrics_access)])
def metrics(request: Request) -> Response:
    """The Prometheus text format: this process's counts, or every worker process's summed."""
    _sampler(request.app).sample(getattr(request.app.state, "worker", None), force=True)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
