"""One submitted generation as its consumer sees it: text deltas and choice ends, streamed or awaited.

A backend (the local `GenerationWorker` on the engine, or `RemoteBackend` on an OpenAI-compatible server)
creates the `Generation` and pushes its events from any thread through `push`; the consumer reads them on
the event loop.

    async for event in gen.events():   # TextDelta(index, text, logprobs) ..., then ChoiceEnd(index, ...)
        ...
    results = await gen.result()       # or: every choice's text at once
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from dialoop.engine import SamplingParams

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's text and log-probability, with the most likely alternatives at its step."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New text of choice `index`, and the logprobs of the tokens decoded with it (when asked for).

    Text and tokens need not line up: text that may start a stop string or end inside a multi-byte
    character is held back, so a delta may carry tokens and no text."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ChoiceEnd:
    """Choice `index` is over: `stop` (EOS or stop string), `length`, `cancelled` or `error`."""

    index: int
    finish_reason: str
    completion_tokens: int
    error: str | None = None
    token_ids: tuple[int, ...] = ()


Event = TextDelta | ChoiceEnd


@dataclass
class ChoiceResult:
    index: int
    text: str
    finish_reason: str
    completion_tokens: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Generation:
    """One submitted request (`n` choices): stream it with `events()`, or await `result()`."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, model: str, prompt_tokens: int, params: list[SamplingParams]
    ):
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.n = len(params)
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._ends: dict[int, ChoiceEnd] = {}
        self._texts: list[list[str]] = [[] for _ in params]
        self._logprobs: list[list[TokenLogprob]] = [[] for _ in params]
        self._consumed = False
        self.cancelled = False
        # the local engine's step count at submission, and at each choice's first token (None: not yet, or
        # a remote backend): how long a request waited, in scheduler steps
        self.submitted_step: int | None = None
        self.first_token_steps: list[int | None] = [None] * self.n
        self.finished = asyncio.Event()
        self.on_cancel: Callable[[], None] | None = None  # set by the backend: stop decoding
        self.on_finished: Callable[[Generation], None] | None = None  # set by the backend: settle

    def push(self, event: Event) -> None:
        """Deliver `event` on the generation's event loop (callable from any thread)."""
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: Event) -> None:
        if event.index in self._ends:
            return  # the choice already ended (e.g. failed, then its cancellation came through)
        if isinstance(event, TextDelta):
            self._texts[event.index].append(event.text)
            self._logprobs[event.index].extend(event.logprobs)
        else:
            self._ends[event.index] = event
        self._queue.put_nowait(event)
        if len(self._ends) == self.n and not self.finished.is_set():
            if self.on_finished is not None:
                self.on_finished(self)
            self.finished.set()

    def cancel(self) -> None:
        """Stop decoding this generation's choices (no-op once finished)."""
        if self.finished.is_set() or self.cancelled:
            return
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()

    async def events(self) -> AsyncGenerator[Event, None]:
        """TextDeltas as they are decoded, then one ChoiceEnd per choice; leaving early cancels."""
        if self._consumed:
            raise RuntimeError("a generation's events can be read only once")
        self._consumed = True
        ended = 0
        try:
            while ended < self.n:
                event = await self._queue.get()
                if isinstance(event, ChoiceEnd):
                    ended += 1
                yield event
        finally:
            if ended < self.n:
                self.cancel()

    async def result(self) -> list[ChoiceResult]:
        """Wait for every choice; cancelling the awaiting task cancels the generation."""
        try:
            await self.finished.wait()
        except asyncio.CancelledError:
            self.cancel()
            raise
        return [
            ChoiceResult(
                index=i,
                text="".join(self._texts[i]),
                finish_reason=self._ends[i].finish_reason,
                completion_tokens=self._ends[i].completion_tokens,
                token_ids=list(self._ends[i].token_ids),
                logprobs=list(self._logprobs[i]),
            )
            for i in range(self.n)
        ]

    @property
    def completion_tokens(self) -> int:
        return sum(e.completion_tokens for e in self._ends.values())
