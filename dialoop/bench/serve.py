"""Serving benchmark: time to first token and aggregate tokens/s for 1, 4 and 8 concurrent streams.

    dialoop bench serve --json

Starts `dialoop serve` in its own process (loopback, a throwaway store) on the embedded default model,
then for each concurrency C runs `rounds` rounds of C streaming chat completion requests arriving
`arrival_s` (0.5 s) apart, as users do. Aggregate tokens/s is a round's completion tokens over the time
from its first request to its last reply. Targets (continuous batching: a stream joins the running batch at
the next step): TTFT p95 at the highest concurrency <= 2x the one-stream TTFT (p50), and aggregate tokens/s
at the highest concurrency >= 6x one stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from dialoop.modeling.device import device_name, pick_device
from dialoop.modeling.loading import default_model_dir
from dialoop.settings import settings
from dialoop.store.accounts import create_api_key, create_user
from dialoop.store.db import session_scope
from dialoop.store.migrate import open_store

log = logging.getLogger(__name__)

TARGET_SPEEDUP = 6.0  # aggregate tokens/s at the highest concurrency over one stream
TARGET_TTFT_RATIO = 2.0  # TTFT p95 at the highest concurrency over the one-stream TTFT (p50)
ARRIVAL_S = 0.5  # seconds between the arrivals of a round's streams
PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright, step by step.",
    "Describe your ideal weekend in detail.",
    "Write a letter to a friend about learning to cook.",
    "List ten things to pack for a week of hiking, and say why for each.",
    "Explain photosynthesis to a ten-year-old.",
    "Tell me about the history of the printing press.",
    "Write a poem about autumn rain in a city.",
)


@dataclass
class LevelResult:
    """The figures for one concurrency level."""

    concurrency: int
    requests: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    batch_sizes: list[int] = field(default_factory=list)


async def _one_stream(http: httpx.AsyncClient, prompt: str, max_tokens: int, seed: int) -> tuple[float, int]:
    """(seconds to the first text, completion tokens) of one streamed request."""
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(
                f"request failed ({response.status_code}): {(await response.aread()).decode()}"
            )
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(f"generation failed: {chunk['error']['message']}")
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    return (first if first is not None else time.perf_counter() - started), tokens


async def _level(
    url: str, key: str, concurrency: int, rounds: int, max_tokens: int, arrival_s: float
) -> tuple[list[float], int, float]:
    """TTFTs, total completion tokens and wall seconds of `rounds` rounds of `concurrency` streams, the
    streams of a round starting `arrival_s` apart."""
    ttfts: list[float] = []
    tokens = 0
    wall = 0.0
    limits = httpx.Limits(max_connections=concurrency + 2)
    headers = {"Authorization": f"Bearer {key}"}

    async def arrive(i: int, r: int) -> tuple[float, int]:
        await asyncio.sleep(i * arrival_s)
        prompt = PROMPTS[(r * concurrency + i) % len(PROMPTS)]
        return await _one_stream(http, prompt, max_tokens, seed=r * 100 + i)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as http:
        for r in range(rounds):
            started = time.perf_counter()
            results = await asyncio.gather(*(arrive(i, r) for i in range(concurrency)))
            wall += time.perf_counter() - started
            ttfts += [t for t, _ in results]
            tokens += sum(n for _, n in results)
    return ttfts, tokens, wall


def _cpu_flags() -> dict[str, bool]:
    """Whether this CPU has the AVX512-BF16 and AVX2 instructions (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())
    return {"avx512_bf16": "avx512_bf16" in flags, "avx2": "avx2" in flags}


@contextmanager
def _server_process(
    model: Path, database_url: str, threads: int | None, max_streams: int, log: Path
) -> Iterator[str]:
    """`dialoop serve` in its own process (as in production: the clients do not share its GIL)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", "from dialoop.cli import app; app()", "serve", "--model", str(model)]
    command += ["--port", str(port), "--database-url", database_url, "--log-level", "warning"]
    if threads is not None:
        command += ["--threads", str(threads)]
    env = {
        **os.environ,
        "DIALOOP_SERVE_MAX_BATCH": str(max(16, max_streams)),
        "DIALOOP_SERVE_MAX_QUEUE": str(4 * max_streams),
    }
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-2000:]}")
            try:
                httpx.get(f"{url}/v1/models", timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start within 600 s") from None
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _stats(url: str, key: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/admin/stats", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    response.raise_for_status()
    stats: dict[str, Any] = response.json()
    return stats


def bench_serve(
    model: str | Path | None = None,
    *,
    concurrency: Sequence[int] = (1, 4, 8),
    rounds: int = 2,
    max_tokens: int = 64,
    threads: int | None = None,
    arrival_s: float = ARRIVAL_S,
) -> dict[str, Any]:
    """Run the benchmark against `dialoop serve` on loopback; returns the figures as a JSON-able dict.

    `threads` sets the server's torch CPU threads (on a shared CPU, 1 avoids oversubscription).
    """
    if not concurrency or min(concurrency) < 1 or rounds < 1 or max_tokens < 1:
        raise ValueError("concurrency levels, rounds and max_tokens must all be >= 1")
    if arrival_s < 0:
        raise ValueError(f"arrival_s must be >= 0, got {arrival_s}")
    model_path = Path(model).resolve() if model is not None else default_model_dir()
    home = settings().home
    home.mkdir(parents=True, exist_ok=True)
    levels: list[LevelResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-", dir=home) as tmp:
        database_url = f"sqlite:///{tmp}/store.db"
        engine = open_store(database_url)
        with session_scope(engine) as session:
            _, key = create_api_key(session, create_user(session, "bench", "admin", "bench-password"))
        engine.dispose()
        with _server_process(
            model_path, database_url, threads, max(concurrency), Path(tmp) / "serve.log"
        ) as url:
            asyncio.run(_level(url, key, 1, 1, 8, 0.0))  # warm up: first-call allocations, lazy inits
            for c in concurrency:
                before = _stats(url, key)["batches"]
                ttfts, tokens, wall = asyncio.run(_level(url, key, c, rounds, max_tokens, arrival_s))
                after = _stats(url, key)
                levels.append(
                    LevelResult(
                        concurrency=c,
                        requests=len(ttfts),
                        completion_tokens=tokens,
                        wall_s=round(wall, 3),
                        tokens_per_s=round(tokens / wall, 2),
                        ttft_p50_ms=round(float(np.percentile(ttfts, 50)) * 1000, 1),
                        ttft_p95_ms=round(float(np.percentile(ttfts, 95)) * 1000, 1),
                        batch_sizes=after["recent_batch_sizes"][-(after["batches"] - before) :],
                    )
                )
                log.info("concurrency %d: %.1f tokens/s", c, levels[-1].tokens_per_s)
    one = next((lv for lv in levels if lv.concurrency == 1), None)
    top = max(levels, key=lambda lv: lv.concurrency)
    speedup = round(top.tokens_per_s / one.tokens_per_s, 2) if one is not None and one.tokens_per_s else None
    ttft_ratio = round(top.ttft_p95_ms / one.ttft_p50_ms, 2) if one is not None and one.ttft_p50_ms else None
    return {
        "benchmark": "serve",
        "model": str(model_path),
        "device": device_name(pick_device()),
        "cpu": _cpu_flags(),
        "server_torch_threads": threads if threads is not None else "default",
        "max_tokens": max_tokens,
        "rounds": rounds,
        "arrival_s": arrival_s,
        "levels": [asdict(lv) for lv in levels],
        "speedup": speedup,
        "speedup_at": top.concurrency,
        "target_speedup": TARGET_SPEEDUP,
        "ttft_p95_over_one_stream": ttft_ratio,
        "target_ttft_ratio": TARGET_TTFT_RATIO,
        "meets_target": speedup is not None
        and speedup >= TARGET_SPEEDUP
        and ttft_ratio is not None
        and ttft_ratio <= TARGET_TTFT_RATIO,
    }
