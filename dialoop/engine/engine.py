"""The engine: continuous batching of token-id requests over a fixed set of KV-cache slots.

Each `step()` frees the slots of cancelled requests, admits waiting requests into free slots (fairly
across owners), prefills every admitted prompt by at most `prefill_chunk` tokens in one batched forward,
decodes one token for every row that was already decoding in another batched forward, and emits one event
per request that changed. A request whose prefill completes samples its first token in that same step.

Shared prefixes are prefilled once: an admitted request whose prompt starts with at least
`MIN_SHARED_PREFIX` tokens of a running request's prompt (n replies to one prompt, K comparison candidates,
a chat template's system prompt) copies those positions' keys and values from that request's slot, as soon
as they are computed, and prefills only the rest (at least its last token, whose logits it needs).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dialoop.engine.params import SamplingParams
from dialoop.engine.request import Completion, Event, FinishReason, Request, RequestHandle, TokenLogprob
from dialoop.engine.runner import ModelRunner, RowInput
from dialoop.engine.sampler import sample_next
from dialoop.engine.scheduler import Scheduler
from dialoop.engine.slots import SlotPool
from dialoop.modeling.scoring import MIN_SHARED_PREFIX


@dataclass(frozen=True)
class EngineConfig:
    max_rows: int = 8  # KV-cache slots: requests decoding at once
    max_len: int = 2048  # positions per slot: prompt + reply (capped by the model's context)
    prefill_chunk: int = 256  # prompt tokens one request prefills per step
    max_queue: int = 256  # waiting requests beyond which submit raises QueueFull
    max_rows_per_owner: int = 0  # slots one owner may hold at once; 0 means no cap

    def validate(self) -> None:
        for name in ("max_rows", "max_len", "prefill_chunk", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_rows_per_owner < 0:
            raise ValueError(f"max_rows_per_owner must be >= 0, got {self.max_rows_per_owner}")


class Engine:
    """Submit prompts (token ids) from any thread; one thread calls `step()` (or `run()`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_token_ids: Sequence[int],
        config: EngineConfig | None = None,
        decode: Callable[[list[int]], str] | None = None,
    ) -> None:
        """`decode` turns reply ids into text (e.g. `tokenizer.decode`); without it there is no text and no
        stop strings."""
        self.config = config or EngineConfig()
        self.config.validate()
        self.eos = frozenset(int(t) for t in eos_token_ids)
        if not self.eos:
            raise ValueError("eos_token_ids is empty: replies would only end at max_tokens")
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_len = min(self.config.max_len, context) if context else self.config.max_len
        self.decode = decode
        self.runner = ModelRunner(model, self.config.max_rows, self.max_len)
        self.slots = SlotPool(self.config.max_rows)
        self.scheduler = Scheduler(self.config.max_queue, self.config.max_rows_per_owner)
        self.running: list[Request] = []  # admitted, in admission order; only the stepping thread touches it
        self._requests: dict[str, Request] = {}  # waiting or running, by id
        self._lock = threading.Lock()
        self._work = threading.Event()  # set when a submit or cancel may give `run` something to do
        self._ids = itertools.count()
        self.steps = 0
        self.prefill_tokens = 0  # prompt tokens run through the model (shared prefixes count once)
        self.prefix_copies = 0  # requests that copied a shared prefix instead of computing it

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        owner: str = "",
        request_id: str | None = None,
    ) -> RequestHandle:
        """Queue a prompt; raises ValueError for bad input and QueueFull when too many are waiting."""
        params = params or SamplingParams()
        params.validate()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the engine's "
                f"{self.max_len} positions per request"
            )
        if params.stop and self.decode is None:
            raise ValueError("stop strings need an engine built with a decode callback")
        with self._lock:
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self._requests:
                raise ValueError(f"request id {rid!r} is already in use")
            request = Request(rid, prompt, params, owner, self.decode)
            self.scheduler.add(request)
            self._requests[rid] = request
        self._work.set()
        return RequestHandle(request, self.cancel)

    def cancel(self, request_id: str) -> None:
        """A waiting request finishes now; a running one frees its slot at the next step."""
        with self._lock:
            request = self._requests.get(request_id)
            waiting = request is not None and self.scheduler.remove(request)
        if request is None:
            return
        if waiting:
            self._finish(request, "cancelled")
            return
        request.cancel_requested.set()
        self._work.set()

    @property
    def has_work(self) -> bool:
        return bool(self.running) or self.scheduler.waiting > 0

    def step(self) -> list[Event]:
        """One scheduler step: cancel, admit, prefill chunks, decode one token per running row."""
        self.steps += 1
        events: list[Event] = []
        for request in [r for r in self.running if r.cancel_requested.is_set()]:
            events.append(self._finish(request, "cancelled"))
        for request in self.scheduler.admit(self.slots.free):
            request.slot = self.slots.take()
            self._find_donor(request)
            self.running.append(request)
        self._copy_prefixes()
        decoding = [r for r in self.running if r.decoding]
        # a request waits while the request it shares a prefix with has not computed that prefix yet
        prefilling = [r for r in self.running if not r.decoding and r.donor is None]
        model = self.runner.model
        was_training = model.training  # PPO's policy is in train mode between rollouts
        model.eval()
        try:
            with torch.inference_mode():
                events += self._forward(prefilling, decoding)
        finally:
            model.train(was_training)
        return events

    def _forward(self, prefilling: list[Request], decoding: list[Request]) -> list[Event]:
        events: list[Event] = []
        if prefilling:
            events += self._prefill(prefilling)
        if decoding:
            rows = []
            for r in decoding:
                assert r.slot is not None
                rows.append(RowInput(r.slot, len(r.prompt_ids) + len(r.output_ids) - 1, r.output_ids[-1:]))
            events += self._accept(decoding, self.runner.forward(rows))
        return events

    def _find_donor(self, request: Request) -> None:
        """Pick the running request whose prompt shares the longest prefix (>= MIN_SHARED_PREFIX) with this
        one's, short of this prompt's last token; its slot will give this request that prefix's KV."""
        prompt = request.prompt_ids
        best, best_len = None, MIN_SHARED_PREFIX - 1
        for other in self.running:
            if other.donor is not None:  # copy from the request that computes the prefix itself
                continue
            limit = min(len(prompt) - 1, len(other.prompt_ids))
            n = 0
            theirs = other.prompt_ids
            while n < limit and prompt[n] == theirs[n]:
                n += 1
            if n > best_len:
                best, best_len = other, n
        if best is not None:
            request.donor, request.shared = best, best_len

    def _copy_prefixes(self) -> None:
        """Requests whose donor has computed their shared prefix copy its keys and values into their slot."""
        pairs = []
        for r in self.running:
            donor = r.donor
            if donor is None:
                continue
            if donor.slot is None:  # cancelled before computing the prefix: prefill it alone
                r.donor = None
            elif donor.prefilled >= r.shared:
                assert r.slot is not None
                pairs.append((donor.slot, r.slot, r.shared))
                r.prefilled, r.donor = r.shared, None
        if pairs:
            self.runner.cache.copy_prefixes(pairs)
            self.prefix_copies += len(pairs)

    def _prefill(self, requests: list[Request]) -> list[Event]:
        chunk = self.config.prefill_chunk
        rows = []
        for r in requests:
            assert r.slot is not None
            rows.append(RowInput(r.slot, r.prefilled, r.prompt_ids[r.prefilled : r.prefilled + chunk]))
            r.prefilled = min(len(r.prompt_ids), r.prefilled + chunk)
        self.prefill_tokens += sum(len(row.tokens) for row in rows)
        logits = self.runner.forward(rows)
        self._copy_prefixes()  # before any donor that finishes in this step frees its slot
        done = [i for i, r in enumerate(requests) if r.prefilled == len(r.prompt_ids)]
        if not done:
            return []
        return self._accept([requests[i] for i in done], logits[done])

    def _accept(self, requests: list[Request], logits: torch.Tensor) -> list[Event]:
        """Sample each request's next token, check its stopping rules, and emit its event."""
        tokens, infos = sample_next(logits, requests)
        return [self._append(r, t, info) for r, t, info in zip(requests, tokens, infos, strict=True)]

    def _append(self, request: Request, token: int, info: TokenLogprob | None) -> Event:
        completion = request.completion
        completion.token_ids.append(token)
        if info is not None:
            completion.logprobs.append(info)
        logprobs = (info,) if info is not None else ()
        if self._is_stop_token(request, token):
            return self._finish(request, "stop", (token,), logprobs)
        text = ""
        if request.text is not None:
            text, matched = request.text.add(completion.token_ids)
            if matched:  # the tracker already cut the text before the stop string
                return self._finish(request, "stop", (token,), logprobs, text, flush=False)
        if len(completion.token_ids) >= request.params.max_tokens:
            return self._finish(request, "length", (token,), logprobs, text)
        return request.emit(Event(request.id, (token,), logprobs, text))

    def _is_stop_token(self, request: Request, token: int) -> bool:
        return token in self.eos or token in request.params.stop_token_ids

    def _finish(
        self,
        request: Request,
        reason: FinishReason,
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[TokenLogprob, ...] = (),
        text: str = "",
        *,
        flush: bool = True,
    ) -> Event:
        """Record the finish, free the slot at once, and emit the last event (with any held-back text)."""
        completion = request.completion
        completion.finish_reason = reason
        if request.text is not None:
            if flush:
                ids = completion.token_ids
                ends_on_stop = bool(ids) and self._is_stop_token(request, ids[-1])
                text += request.text.finish(ids[:-1] if ends_on_stop else ids)
            completion.text = request.text.text
        if request.slot is not None:
            self.slots.give_back(request.slot)
            request.slot = None
            self.running.remove(request)
            self.scheduler.release(request)
        with self._lock:
            self._requests.pop(request.id, None)
        return request.emit(Event(request.id, token_ids, logprobs, text, reason))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        owner: str = "",
    ) -> list[Completion]:
        """Submit every prompt and step until all finish (the synchronous path: evaluation, PPO rollouts).

        Prompts beyond the free queue wait in this call rather than raising QueueFull. Not for an engine
        that a `run()` thread is stepping: there, submit and read the handles instead."""
        row_params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(row_params) != len(prompts):
            raise ValueError(f"got {len(row_params)} SamplingParams for {len(prompts)} prompts")
        for p in row_params:
            p.validate()
        handles: list[RequestHandle] = []
        pending = list(zip(prompts, row_params, strict=True))
        while pending or any(not h.finished for h in handles):
            while pending and self.scheduler.waiting < self.config.max_queue:
                prompt, p = pending.pop(0)
                handles.append(self.submit(prompt, p, owner=owner))
            self.step()
        return [h.result() for h in handles]

    def run(self, stop: threading.Event, idle_wait: float = 0.05) -> None:
        """Step until `stop` is set, sleeping while there is nothing to do (a server's engine thread)."""
        while not stop.is_set():
            if self.has_work:
                self.step()
            else:
                self._work.wait(idle_wait)
                self._work.clear()
