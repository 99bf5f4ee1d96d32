"""The generation worker: the server's generations on `dialoop.engine`, streamed back to asyncio consumers.

Each loaded model version gets one `Engine` (a fixed set of KV-cache slots) stepped by its own thread.
A request becomes one engine request per choice, owned by the user who asked; it joins the running batch
at the next step (continuous batching) and leaves it, freeing its slot, as soon as it ends or is
cancelled. Admission is round-robin across owners, with an optional cap of slots per owner. After each
step the thread hands every request's new text, logprobs and finish to its `Generation` on the event loop.

    gen = await worker.submit([{"role": "user", "content": "Hi"}], max_tokens=64, owner="user:7")
    async for event in gen.events():   # see dialoop.serve.decoding
        ...
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dialoop.engine import Engine, EngineConfig, RequestHandle, SamplingParams
from dialoop.engine import Event as EngineEvent
from dialoop.engine import QueueFull as EngineQueueFull
from dialoop.engine import TokenLogprob as EngineLogprob
from dialoop.modeling.chat import decode_reply, encode_prompt
from dialoop.records import ChatMessage
from dialoop.serve.decoding import ChoiceEnd, Generation, TextDelta, TokenLogprob
from dialoop.serve.models import LoadedModel, ModelRegistry

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long an engine thread sleeps when it has nothing to do (a submit wakes it)


class QueueFull(Exception):
    """Too many replies wait for a KV-cache slot; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ContextTooLong(ValueError):
    """The prompt plus the requested tokens do not fit the model's context."""


@dataclass
class WorkerStats:
    """Counters for tests, benchmarks, the admin page and /metrics."""

    submitted: int = 0  # generations accepted
    completed: int = 0  # generations whose every choice ended by stop or length
    cancelled: int = 0  # generations cancelled before they finished
    failed: int = 0
    rejected: int = 0  # refused because the queue was full
    batches: int = 0  # engine steps that decoded at least one row
    rows_decoded: int = 0  # engine requests (choices) that ended
    tokens_generated: int = 0
    largest_batch: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1000))  # rows per step
    cancelled_ids: deque[str] = field(default_factory=lambda: deque(maxlen=1000))

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if not isinstance(v, deque)}
        out["recent_batch_sizes"] = list(self.batch_sizes)[-100:]
        return out


@dataclass
class _Row:
    """One choice of one generation inside an engine (touched by its engine thread once submitted)."""

    gen: Generation
    index: int
    handle: RequestHandle
    submitted_at: float = field(default_factory=time.monotonic)
    ended: bool = False


class _EngineThread:
    """One model's engine and the thread that steps it."""

    def __init__(self, lm: LoadedModel, config: EngineConfig):
        self.lm = lm
        tokenizer = lm.tokenizer
        self.engine = Engine(
            lm.model,
            eos_token_ids=lm.eos_token_ids,
            config=config,
            decode=lambda ids: decode_reply(tokenizer, ids),
        )
        self.rows: dict[str, _Row] = {}  # by engine request id
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def token_text(self, token_id: int) -> str:
        return str(self.lm.tokenizer.decode([token_id]))


class GenerationWorker:
    """The server's generations on one engine per loaded model, each stepped by a background thread."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        max_queue: int = 64,
        max_batch: int = 16,
        max_len: int = 2048,
        prefill_chunk: int = 256,
        max_rows_per_owner: int = 0,
        default_max_tokens: int = 512,
    ):
        """`max_batch` is the KV-cache slots of each engine (rows decoding at once), `max_len` the positions
        of each slot, `max_queue` the replies that may wait for a slot (429 beyond)."""
        self.registry = registry
        self.config = EngineConfig(
            max_rows=max_batch,
            max_len=max_len,
            prefill_chunk=prefill_chunk,
            max_queue=max_queue,
            max_rows_per_owner=max_rows_per_owner,
        )
        self.config.validate()
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.default_max_tokens = default_max_tokens
        self.stats = WorkerStats()
        self._engines: dict[int, _EngineThread] = {}  # by id() of the loaded model
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seconds_per_reply = 1.0  # running estimate of a reply's time in a slot, for Retry-After

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the worker is started and its engine threads are alive."""
        return self._loop is not None and all(
            et.thread is not None and et.thread.is_alive() for et in self._engines.values()
        )

    async def start(self, *, preload: bool = True) -> None:
        """Start the worker; with `preload`, load the served model (and build its engine) now."""
        self._loop = asyncio.get_running_loop()
        if preload:
            lm = await self.registry.acquire(None)
            try:
                self._engine_for(lm)
            finally:
                self.registry.release(lm)

    async def stop(self) -> None:
        """Cancel whatever is queued or decoding, then stop the engine threads."""
        engines = list(self._engines.values())
        for et in engines:
            with et.lock:
                gens = {row.gen for row in et.rows.values()}
            for gen in gens:
                gen.cancel()
        for et in engines:
            et.stop.set()
            et.wake.set()
        for et in engines:
            if et.thread is not None:
                await asyncio.to_thread(et.thread.join)
            self._drain(et)  # the cancellations' last events
            with et.lock:
                left, et.rows = list(et.rows.values()), {}
            for row in left:
                self._end(row, ChoiceEnd(row.index, "cancelled", 0))
        self._engines.clear()
        self._loop = None

    # --- submitting -----------------------------------------------------------------------------------

    async def submit(
        self,
        messages: list[ChatMessage] | None = None,
        *,
        text: str | None = None,
        prompt_ids: Sequence[int] | None = None,
        model: str | None = None,
        n: int = 1,
        owner: str = "",
        max_tokens: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        **sampling: Any,
    ) -> Generation:
        """Queue a generation of `n` choices for `messages` (chat template applied), a plain `text` prompt
        (tokenized as is, with the tokenizer's special tokens) or raw `prompt_ids`.

        `model` is a version name (None: the served one); `owner` (a user id, an API key) is whom the
        engine's fair admission counts the rows against. With no `max_tokens`, as many as fit the
        context, up to `default_max_tokens`. Choice i uses seed `seed + i`. `sampling` holds the other
        fields of `dialoop.engine.SamplingParams` (temperature, top_p, top_k, min_p, penalties, logprobs,
        top_logprobs). Raises QueueFull, UnknownModel, ContextTooLong, ValueError.
        """
        if sum(x is not None for x in (messages, text, prompt_ids)) != 1:
            raise ValueError("give exactly one of messages, text and prompt_ids")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n > self.config.max_queue:  # the n choices wait for slots together
            raise ValueError(f"n must be at most {self.config.max_queue} (the server's queue), got {n}")
        if self._loop is None or not self.running:
            raise RuntimeError("the generation worker is not running")
        lm = await self.registry.acquire(model)
        try:
            if prompt_ids is not None:
                ids = [int(t) for t in prompt_ids]
            elif text is not None:
                ids = list((await asyncio.to_thread(lm.tokenizer, text))["input_ids"])
            else:  # a long conversation takes a while to tokenize: keep the event loop free
                ids = await asyncio.to_thread(encode_prompt, lm.tokenizer, messages or [])
            et = self._engine_for(lm)
            budget = self._token_budget(lm, et.engine.max_len, len(ids), max_tokens)
            params = [
                SamplingParams(
                    max_tokens=budget,
                    seed=None if seed is None else seed + i,
                    stop=tuple(s for s in stop if s),
                    **sampling,
                )
                for i in range(n)
            ]
            for p in params:
                p.validate()
            gen = self._start(et, ids, params, owner)
        except BaseException:
            self.registry.release(lm)
            raise
        self.stats.submitted += 1
        return gen

    def _start(
        self, et: _EngineThread, ids: list[int], params: list[SamplingParams], owner: str
    ) -> Generation:
        assert self._loop is not None
        engine = et.engine
        if engine.scheduler.waiting + len(params) > self.max_queue:
            self._reject(engine.scheduler.waiting)
        gen = Generation(self._loop, et.lm.name, len(ids), params)
        rows: list[_Row] = []
        # holding the lock, the engine thread hands out no events before the rows are listed
        with et.lock:
            try:
                for i, p in enumerate(params):
                    handle = engine.submit(ids, p, owner=owner, request_id=f"{gen.id}-{i}")
                    rows.append(_Row(gen, i, handle))
            except EngineQueueFull:
                for row in rows:
                    row.handle.cancel()
                rows = []
            else:
                et.rows.update((row.handle.id, row) for row in rows)
                # read after submitting: the step after this count admits the rows at the latest
                gen.submitted_step = engine.steps
        if not rows:
            self._reject(engine.scheduler.waiting)
        et.wake.set()
        lm = et.lm

        def cancel() -> None:
            for row in rows:
                row.handle.cancel()
            et.wake.set()

        def finished(g: Generation) -> None:
            self._settle(g)
            self.registry.release(lm)
            self._retire_unloaded()

        gen.on_cancel = cancel
        gen.on_finished = finished
        return gen

    def _reject(self, waiting: int) -> None:
        self.stats.rejected += 1
        retry_after = max(1, math.ceil((waiting / self.max_batch + 1) * self._seconds_per_reply))
        raise QueueFull(
            f"The server is busy: {waiting} replies wait for a slot (limit {self.max_queue}); retry later",
            retry_after=retry_after,
        )

    def _token_budget(self, lm: LoadedModel, max_len: int, prompt_len: int, max_tokens: int | None) -> int:
        if prompt_len == 0:
            raise ValueError("the prompt is empty")
        if prompt_len >= max_len:
            raise ContextTooLong(
                f"The prompt is {prompt_len} tokens; model `{lm.name}` is served with a context of "
                f"{max_len} tokens"
            )
        if max_tokens is None:
            return min(self.default_max_tokens, max_len - prompt_len)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if prompt_len + max_tokens > max_len:
            raise ContextTooLong(
                f"The prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the context "
                f"of model `{lm.name}` ({max_len} tokens)"
            )
        return max_tokens

    def cancel(self, generation_id: str) -> bool:
        """Cancel a queued or decoding generation by id; False when there is none with that id."""
        for et in list(self._engines.values()):
            with et.lock:
                gen = next((r.gen for r in et.rows.values() if r.gen.id == generation_id), None)
            if gen is not None:
                gen.cancel()
                return True
        return False

    # --- the engines ----------------------------------------------------------------------------------

    def _engine_for(self, lm: LoadedModel) -> _EngineThread:
        """The engine of loaded model `lm`, started on first use; engines of unloaded models are retired."""
        self._retire_unloaded()
        et = self._engines.get(id(lm))
        if et is None or et.lm is not lm:
            et = _EngineThread(lm, self.config)
            et.thread = threading.Thread(
                target=self._run, args=(et,), name=f"dialoop-engine-{lm.name}", daemon=True
            )
            self._engines[id(lm)] = et
            et.thread.start()
            log.info(
                "engine for %s: %d KV slots x %d positions", lm.name, self.config.max_rows, et.engine.max_len
            )
        return et

    def _retire_unloaded(self) -> None:
        """Stop the idle engines of models the registry has unloaded (their KV cache goes with them)."""
        for key, et in list(self._engines.items()):
            if not self.registry.is_loaded(et.lm) and not et.rows:
                et.stop.set()
                et.wake.set()
                del self._engines[key]
                log.info("stopped the engine of unloaded model %s", et.lm.name)

    def _run(self, et: _EngineThread) -> None:
        """The engine thread: step while there is work, hand out the events after every step."""
        engine = et.engine
        while not et.stop.is_set():
            et.wake.clear()
            if not engine.has_work:
                self._drain(et)  # a request cancelled while it waited finished outside any step
                et.wake.wait(IDLE_WAIT_S)
                continue
            try:
                with torch.inference_mode():  # the server never needs gradients
                    engine.step()
            except Exception as exc:  # the step's rows fail; the engine and every other request go on
                log.exception("an engine step of %s failed", et.lm.name)
                self._fail_running(et, exc)
            try:
                self._drain(et)
            except Exception:
                log.exception("handing out the events of %s failed", et.lm.name)

    def _fail_running(self, et: _EngineThread, exc: Exception) -> None:
        running = {r.id for r in et.engine.running}
        with et.lock:
            rows = [row for rid, row in et.rows.items() if rid in running]
        for row in rows:
            self._end(row, ChoiceEnd(row.index, "error", 0, f"generation failed: {exc}"))
            row.handle.cancel()  # frees its slot at the next step

    def _drain(self, et: _EngineThread) -> None:
        """Hand every row's new events to its generation (on the engine thread)."""
        with et.lock:
            rows = list(et.rows.values())
        decoded = 0
        for row in rows:
            got_token = False
            for event in _ready_events(row.handle):
                if event.token_ids:
                    got_token = True
                    self.stats.tokens_generated += len(event.token_ids)
                    if row.gen.first_token_steps[row.index] is None:
                        row.gen.first_token_steps[row.index] = et.engine.steps
                self._deliver(et, row, event)
            decoded += got_token
        if decoded:
            self.stats.batches += 1
            self.stats.batch_sizes.append(decoded)
            self.stats.largest_batch = max(self.stats.largest_batch, decoded)

    def _deliver(self, et: _EngineThread, row: _Row, event: EngineEvent) -> None:
        if not row.ended:
            logprobs = tuple(_logprob(et, info) for info in event.logprobs)
            if event.text or logprobs:
                row.gen.push(TextDelta(row.index, event.text, logprobs))
        if event.finish_reason is not None:  # (a row that failed ends here in the engine, silently)
            completion = row.handle.result(timeout=0)
            ids = tuple(completion.token_ids)
            self._end(row, ChoiceEnd(row.index, event.finish_reason, len(ids), None, ids))
            with et.lock:
                et.rows.pop(row.handle.id, None)
            self.stats.rows_decoded += 1
            if event.finish_reason != "cancelled":
                elapsed = time.monotonic() - row.submitted_at
                self._seconds_per_reply = 0.8 * self._seconds_per_reply + 0.2 * elapsed

    def _end(self, row: _Row, end: ChoiceEnd) -> None:
        if not row.ended:
            row.ended = True
            row.gen.push(end)

    def _settle(self, gen: Generation) -> None:
        """Count the outcome of a generation whose choices have all ended (on the event loop)."""
        reasons = {e.finish_reason for e in gen._ends.values()}
        if "error" in reasons:
            self.stats.failed += 1
        elif "cancelled" in reasons:
            self.stats.cancelled += 1
            self.stats.cancelled_ids.append(gen.id)
            log.info("generation %s cancelled after %d tokens", gen.id, gen.completion_tokens)
        else:
            self.stats.completed += 1

    # --- what it is doing -----------------------------------------------------------------------------

    @property
    def queued_rows(self) -> int:
        """Replies waiting for a KV-cache slot, over every engine."""
        return sum(et.engine.scheduler.waiting for et in list(self._engines.values()))

    def metrics(self) -> dict[str, int]:
        """Gauges and counters for /metrics (one engine per loaded model, summed)."""
        engines = [et.engine for et in list(self._engines.values())]
        used = sum(e.config.max_rows - e.slots.free for e in engines)
        return {
            "queue_depth": sum(e.scheduler.waiting for e in engines),
            "rows_running": sum(len(e.running) for e in engines),
            "kv_slots_total": sum(e.config.max_rows for e in engines),
            "kv_slots_used": used,
            "tokens_generated_total": self.stats.tokens_generated,
            "requests_rejected_total": self.stats.rejected,
        }

    def engine_of(self, model: str | None = None) -> Engine | None:
        """The engine of a loaded model version (None: the served one), if it has one."""
        name = self.registry.served if model is None else model
        return next((et.engine for et in self._engines.values() if et.lm.name == name), None)


def _ready_events(handle: RequestHandle) -> list[EngineEvent]:
    """The events a request has emitted so far, without waiting."""
    out: list[EngineEvent] = []
    try:
        for event in handle.events(timeout=0):
            out.append(event)
    except queue.Empty:
        pass
    return out


def _logprob(et: _EngineThread, info: EngineLogprob) -> TokenLogprob:
    return TokenLogprob(
        et.token_text(info.token_id),
        info.logprob,
        tuple((et.token_text(t), lp) for t, lp in info.top),
    )
