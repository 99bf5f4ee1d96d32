"""One request's state inside the engine, the events it emits, and the handle its submitter holds."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from dialoop.engine.params import SamplingParams
from dialoop.engine.text import TextTracker

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability and the `top_logprobs` most likely tokens at its step."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Event:
    """What one step did for one request: new tokens (at most one), their logprobs, new text, the finish."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    text: str = ""
    finish_reason: FinishReason | None = None


@dataclass
class Completion:
    """A finished request: reply ids (with a final stop token id when it ended on one) and its text."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # excludes a matched stop string and a final stop token
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        """Whether the reply ended itself (a stop token or string), not cut at max_tokens or cancelled."""
        return self.finish_reason == "stop"


class Request:
    """A submitted prompt's scheduling and sampling state; only the stepping thread mutates it."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        owner: str,
        decode: Callable[[list[int]], str] | None,
    ) -> None:
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.owner = owner
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens already in the KV cache
        self.donor: Request | None = None  # the running request whose slot will give this one its prefix
        self.shared = 0  # prompt tokens to copy from the donor's slot
        self.completion = Completion(request_id, prompt_ids)
        self.text = TextTracker(decode, params.stop) if decode is not None else None
        self.cancel_requested = threading.Event()
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()

    @property
    def output_ids(self) -> list[int]:
        return self.completion.token_ids

    @property
    def finished(self) -> bool:
        return self.completion.finish_reason is not None

    @property
    def decoding(self) -> bool:
        return self.slot is not None and self.prefilled == len(self.prompt_ids) and not self.finished

    def emit(self, event: Event) -> Event:
        self.events.put(event)
        return event


class RequestHandle:
    """The submitter's view: read events (thread-safe), wait for the completion, or cancel."""

    def __init__(self, request: Request, cancel: Callable[[str], None]) -> None:
        self._request = request
        self._cancel = cancel
        self.id = request.id
        self.owner = request.owner
        self._done = False

    def cancel(self) -> None:
        """Stop the request: a waiting one leaves the queue now, a running one frees its slot next step."""
        self._cancel(self.id)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events in order until the finishing one; raises queue.Empty when none comes within `timeout`."""
        while not self._done:
            event = self._request.events.get(timeout=timeout)
            self._done = event.finish_reason is not None
            yield event

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request finishes (drains its events)."""
        for _ in self.events(timeout):
            pass
        return self._request.completion

    @property
    def finished(self) -> bool:
        return self._request.finished
