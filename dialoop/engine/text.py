"""Incremental detokenization with stop strings that may span token boundaries."""

from __future__ import annotations

from collections.abc import Callable


class TextTracker:
    """Decodes a growing reply and finds stop strings in it, holding back text that could start one."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]) -> None:
        self.decode = decode
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string's prefix may end the text
        self.emitted = 0  # characters already handed out
        self.searched = 0  # stop strings cannot start before this character
        self.text = ""

    def add(self, token_ids: list[int]) -> tuple[str, bool]:
        """The new safe text after `token_ids` (the whole reply so far) and whether a stop string matched;
        on a match the text ends right before the stop string."""
        self.text = self.decode(token_ids)
        start = max(0, self.searched - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._take(len(self.text)), True
        self.searched = len(self.text)
        safe = len(self.text) - self.hold
        if self.text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its next token
            safe = min(safe, len(self.text) - 1)
        return self._take(safe), False

    def finish(self, token_ids: list[int]) -> str:
        """The rest of the text when the reply ends; `token_ids` leaves out a final stop token."""
        self.text = self.decode(token_ids)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
