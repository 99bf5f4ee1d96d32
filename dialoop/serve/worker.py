"""The generation worker: one loop that batches concurrent requests and streams their tokens back.

Requests wait in a bounded queue. The loop takes the oldest one, waits for others to arrive (until
`batch_window_s` passes with no new arrival, at most 5 windows), and decodes every queued request for
the same model in one `sample` call on a background thread; each row's new text reaches its asyncio
consumer through `on_step` as soon as it is decoded.
A consumer that goes away (client disconnect, stop button) cancels its rows at the next step.
A request that arrives while a batch decodes waits for that batch (no continuous batching: one
`sample` call decodes a fixed set of rows; finished rows leave it, new ones cannot join).

    gen = await worker.submit([{"role": "user", "content": "Hi"}], max_tokens=64)
    async for event in gen.events():   # see dialoop.serve.decoding
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dialoop.modeling.chat import encode_prompt
from dialoop.modeling.generation import SamplingParams, sample
from dialoop.records import ChatMessage
from dialoop.serve.decoding import ChoiceEnd, Generation, _Row
from dialoop.serve.models import LoadedModel, ModelRegistry

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` rows already; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ContextTooLong(ValueError):
    """The prompt plus the requested tokens do not fit the model's context."""


@dataclass
class WorkerStats:
    """Counters for tests, benchmarks and the admin page."""

    submitted: int = 0  # generations accepted
    completed: int = 0  # generations whose every choice ended by stop or length
    cancelled: int = 0  # generations cancelled before they finished
    failed: int = 0
    rejected: int = 0  # refused because the queue was full
    batches: int = 0
    rows_decoded: int = 0
    tokens_generated: int = 0
    largest_batch: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1000))
    cancelled_ids: deque[str] = field(default_factory=lambda: deque(maxlen=1000))

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if not isinstance(v, deque)}
        out["recent_batch_sizes"] = list(self.batch_sizes)[-100:]
        return out


class GenerationWorker:
    """Batches queued generations per model and decodes them on one background thread."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        max_queue: int = 64,
        max_batch: int = 16,
        batch_window_s: float = 0.01,
        default_max_tokens: int = 512,
    ):
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be >= 1")
        self.registry = registry
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.default_max_tokens = default_max_tokens
        self.stats = WorkerStats()
        self._pending: deque[Generation] = deque()
        self._reserved = 0  # rows accepted but not yet decoding (queued, or loading their model)
        self._running: list[Generation] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._seconds_per_batch = 1.0  # running estimate, for Retry-After

    @property
    def queued_rows(self) -> int:
        return self._reserved

    @property
    def running(self) -> bool:
        """True while the loop is started and has not stopped or crashed."""
        return self._task is not None and not self._task.done()

    async def start(self, *, preload: bool = True) -> None:
        """Start the loop; with `preload`, load the served model now rather than on the first request."""
        self._wake = asyncio.Event()  # bound to this event loop: the worker may be started again later
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dialoop-generate")
        self._task = asyncio.create_task(self._run(), name="dialoop-generation-worker")
        if preload:
            self.registry.release(await self.registry.acquire(None))

    async def stop(self) -> None:
        """Cancel whatever is queued or decoding, then stop the loop and its thread."""
        for gen in list(self._pending) + list(self._running):
            gen.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for gen in self._pending:
            self._finish_unstarted(gen, "cancelled")
        self._pending.clear()
        if self._executor is not None:
            # off the event loop, so that the decoding thread's last events can still be delivered
            await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def submit(
        self,
        messages: list[ChatMessage] | None = None,
        *,
        prompt_ids: Sequence[int] | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        n: int = 1,
        stop: Sequence[str] = (),
    ) -> Generation:
        """Queue a generation of `n` choices for `messages` (chat template applied) or raw `prompt_ids`.

        `model` is a version name (None: the served one). With no `max_tokens`, as many as fit the
        context, up to `default_max_tokens`. Choice i uses seed `seed + i`. Raises QueueFull,
        UnknownModel, ContextTooLong, ValueError.
        """
        if (messages is None) == (prompt_ids is None):
            raise ValueError("give exactly one of messages and prompt_ids")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n > self.max_batch:
            raise ValueError(f"n must be at most {self.max_batch}, got {n}")
        if not self.running:
            raise RuntimeError("the generation worker is not running")
        if self._reserved + n > self.max_queue:
            self.stats.rejected += 1
            raise QueueFull(
                f"The server is busy: {self._reserved} queued replies (limit {self.max_queue}); retry later",
                retry_after=self._retry_after(),
            )
        self._reserved += n
        queued = False
        try:
            lm = await self.registry.acquire(model)
            try:
                if prompt_ids is not None:
                    ids = list(prompt_ids)
                else:  # a long conversation takes a while to tokenize: keep the event loop free
                    ids = await asyncio.to_thread(encode_prompt, lm.tokenizer, messages or [])
                budget = self._token_budget(lm, len(ids), max_tokens)
                params = [
                    SamplingParams(
                        max_new_tokens=budget,
                        temperature=temperature,
                        top_p=top_p,
                        seed=None if seed is None else seed + i,
                    )
                    for i in range(n)
                ]
                for p in params:
                    p.validate()
                gen = Generation(asyncio.get_running_loop(), lm, ids, params, stop)
                gen._on_finished = self._settle
            except BaseException:
                self.registry.release(lm)
                raise
            self._pending.append(gen)
            queued = True
            self.stats.submitted += 1
            self._wake.set()
            return gen
        finally:
            if not queued:
                self._reserved -= n

    def cancel(self, generation_id: str) -> bool:
        """Cancel a queued or decoding generation by id; False when there is none with that id."""
        for gen in list(self._pending) + list(self._running):
            if gen.id == generation_id:
                gen.cancel()
                return True
        return False

    def _token_budget(self, lm: LoadedModel, prompt_len: int, max_tokens: int | None) -> int:
        if prompt_len == 0:
            raise ValueError("the prompt is empty")
        context = lm.context_length
        if context is not None and prompt_len >= context:
            raise ContextTooLong(
                f"The prompt is {prompt_len} tokens; model `{lm.name}` has a context of {context} tokens"
            )
        if max_tokens is None:
            room = context - prompt_len if context is not None else self.default_max_tokens
            return min(self.default_max_tokens, room)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if context is not None and prompt_len + max_tokens > context:
            raise ContextTooLong(
                f"The prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"context of model `{lm.name}` ({context} tokens)"
            )
        return max_tokens

    def _retry_after(self) -> int:
        waiting_batches = self._reserved / self.max_batch + 1
        return max(1, math.ceil(waiting_batches * self._seconds_per_batch))

    def _take_batch(self) -> list[Generation]:
        """The oldest queued generation and the other queued ones for its model, up to max_batch rows."""
        first = self._pending[0]
        batch: list[Generation] = []
        rows = 0
        rest: deque[Generation] = deque()
        while self._pending:
            gen = self._pending.popleft()
            if gen.cancelled:
                self._reserved -= gen.n
                self._finish_unstarted(gen, "cancelled")
            elif gen._lm is first._lm and rows + gen.n <= self.max_batch:
                batch.append(gen)
                rows += gen.n
                self._reserved -= gen.n
            else:
                rest.append(gen)
        self._pending = rest
        return batch

    def _finish_unstarted(self, gen: Generation, reason: str) -> None:
        for i in range(gen.n):
            gen._deliver(ChoiceEnd(i, reason, 0))

    def _settle(self, gen: Generation) -> None:
        """Count the outcome of a generation whose choices have all ended, and give back its model."""
        reasons = {e.finish_reason for e in gen._ends.values()}
        if "error" in reasons:
            self.stats.failed += 1
        elif "cancelled" in reasons:
            self.stats.cancelled += 1
            self.stats.cancelled_ids.append(gen.id)
            log.info("generation %s cancelled after %d tokens", gen.id, gen.completion_tokens)
        else:
            self.stats.completed += 1
        self.registry.release(gen._lm)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if not self._pending:
                self._wake.clear()
                continue
            # requests that arrive together decode together; a busy event loop spreads "together" out
            # a little, so keep waiting while requests keep coming (bounded, to cap the added latency)
            for _ in range(5):
                arrived = len(self._pending)
                await asyncio.sleep(self.batch_window_s)
                if len(self._pending) == arrived or sum(g.n for g in self._pending) >= self.max_batch:
                    break
            batch = self._take_batch()
            if not batch:
                continue
            self._running = batch
            started = time.monotonic()
            try:
                await loop.run_in_executor(self._executor, self._decode, batch)
            finally:
                self._running = []
            self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * (time.monotonic() - started)

    def _decode(self, batch: list[Generation]) -> None:
        """Decode one batch (on the worker thread), pushing events as tokens arrive.

        When the batched call fails, each request that has not streamed a token yet is decoded again on
        its own, so that a request the sampler cannot serve fails alone rather than with its batch.
        """
        lm = batch[0]._lm
        rows = [_Row(gen, i, p, lm.tokenizer) for gen in batch for i, p in enumerate(gen.params)]
        for gen in batch:
            gen._rows = [r for r in rows if r.gen is gen]
        self.stats.batches += 1
        self.stats.rows_decoded += len(rows)
        self.stats.batch_sizes.append(len(rows))
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))

        failure = self._sample(lm, rows)
        if failure is not None:
            for gen in batch:
                unfinished = [r for r in gen._rows if not r.ended]
                alone = len(batch) > 1 and unfinished and not any(r.token_ids for r in gen._rows)
                error = self._sample(lm, unfinished) if alone else failure
                if error is not None:
                    for row in unfinished:
                        row.end("error", f"generation failed: {error}")
        for row in rows:
            # rows the sampler never stepped (cancelled before their first token) end here
            row.end("cancelled" if row.gen.cancelled else "error", "generation ended without a result")

    def _sample(self, lm: LoadedModel, rows: list[_Row]) -> Exception | None:
        """Decode `rows` in one `sample` call; the exception it raised, if any (logged)."""
        eos = set(lm.eos_token_ids)

        def on_step(step: list[int | None]) -> list[int]:
            cut = []
            for r, token in enumerate(step):
                row = rows[r]
                if token is None or row.ended:
                    continue
                self.stats.tokens_generated += 1
                if row.gen.cancelled:
                    row.token_ids.append(token)
                    row.end("cancelled")
                    cut.append(r)
                elif row.feed(token, eos):
                    cut.append(r)
            return cut

        try:
            sample(
                lm.model,
                [row.gen.prompt_ids for row in rows],
                [row.params for row in rows],
                eos_token_ids=lm.eos_token_ids,
                pad_token_id=lm.pad_token_id,
                on_step=on_step,
            )
        except Exception as exc:
            log.exception("generation failed for %d rows of %s", len(rows), {r.gen.id for r in rows})
            return exc
        return None
