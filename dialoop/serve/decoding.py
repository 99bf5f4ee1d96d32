"""One submitted generation as its consumer sees it: text deltas and choice ends, streamed or awaited.

The worker's decoding thread feeds each choice's tokens to a `_Row`, which detokenizes them
incrementally, holds back text where a stop string may start, and pushes events onto the generation's
asyncio queue through the event loop.

    async for event in gen.events():   # TextDelta(index, text) ..., then ChoiceEnd(index, finish_reason, ...)
        ...
    results = await gen.result()       # or: every choice's text at once
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dialoop.modeling.generation import SamplingParams
from dialoop.serve.models import LoadedModel

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass(frozen=True)
class TextDelta:
    """New text of choice `index`."""

    index: int
    text: str


@dataclass(frozen=True)
class ChoiceEnd:
    """Choice `index` is over: `stop` (EOS or stop string), `length`, `cancelled` or `error`."""

    index: int
    finish_reason: str
    completion_tokens: int
    error: str | None = None


Event = TextDelta | ChoiceEnd


@dataclass
class ChoiceResult:
    index: int
    text: str
    finish_reason: str
    completion_tokens: int
    token_ids: list[int]


class _Detokenizer:
    """Incremental decoding that never emits half of a multi-byte character.

    Decoding a short window before the new tokens, and holding text back while it ends in U+FFFD
    (an incomplete UTF-8 sequence), keeps the concatenated deltas equal to decoding everything at once.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # tokens before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]


class _Row:
    """One choice of one generation while it decodes (touched only by the decoding thread)."""

    def __init__(self, gen: Generation, index: int, params: SamplingParams, tokenizer: Any):
        self.gen = gen
        self.index = index
        self.params = params
        self.detok = _Detokenizer(tokenizer)
        self.held = ""  # text not yet emitted because a stop string may start in it
        self.token_ids: list[int] = []
        self.ended = False

    def emit(self, text: str) -> None:
        if text:
            self.gen._push(TextDelta(self.index, text))

    def end(self, reason: str, error: str | None = None) -> None:
        if not self.ended:
            self.ended = True
            self.gen._push(ChoiceEnd(self.index, reason, len(self.token_ids), error))

    def feed(self, token_id: int, eos: set[int]) -> bool:
        """Take one new token; True when this row is done (EOS, stop string, or its token budget)."""
        self.token_ids.append(token_id)
        if token_id in eos:
            self.emit(self.held + self.detok.flush())
            self.end("stop")
            return True
        text = self.held + self.detok.push(token_id)
        stops = self.gen.stop
        if stops:
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hits:
                self.emit(text[: min(hits)])
                self.end("stop")
                return True
            # a stop string shorter than L can only start in the last L-1 characters
            keep = max(len(s) for s in stops) - 1
            cut = max(len(text) - keep, 0)
            self.emit(text[:cut])
            self.held = text[cut:]
        else:
            self.emit(text)
        if len(self.token_ids) >= self.params.max_new_tokens:
            self.emit(self.held + self.detok.flush())
            self.end("length")
            return True
        return False


class Generation:
    """One submitted request (`n` choices): stream it with `events()`, or await `result()`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        lm: LoadedModel,
        prompt_ids: list[int],
        params: list[SamplingParams],
        stop: Sequence[str],
    ):
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self.model = lm.name
        self.prompt_ids = prompt_ids
        self.prompt_tokens = len(prompt_ids)
        self.params = params
        self.stop = [s for s in stop if s]
        self.n = len(params)
        self._lm = lm
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._ends: dict[int, ChoiceEnd] = {}
        self._texts: list[list[str]] = [[] for _ in params]
        self._rows: list[_Row] = []
        self._consumed = False
        self.cancelled = False  # read by the decoding thread; a plain bool is safe across threads
        self.finished = asyncio.Event()
        self._on_finished: Callable[[Generation], None] | None = None

    def _push(self, event: Event) -> None:
        """Called from the decoding thread."""
        self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self._texts[event.index].append(event.text)
        else:
            self._ends[event.index] = event
        self._queue.put_nowait(event)
        if len(self._ends) == self.n and not self.finished.is_set():
            if self._on_finished is not None:
                self._on_finished(self)
            self.finished.set()

    def cancel(self) -> None:
        """Stop decoding this generation's rows at the next step (no-op once finished)."""
        if not self.finished.is_set():
            self.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
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
                token_ids=list(self._rows[i].token_ids) if self._rows else [],
            )
            for i in range(self.n)
        ]

    @property
    def completion_tokens(self) -> int:
        return sum(e.completion_tokens for e in self._ends.values())
