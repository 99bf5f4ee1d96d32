"""The scheduler: a bounded waiting queue per owner, and fair admission of waiting requests into slots.

Admission is round-robin across owners: the next request comes from the waiting owner served least
recently, so one owner's burst cannot delay another owner's single request. `max_rows_per_owner` caps the
slots one owner holds at once (0: no cap).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque

from dialoop.engine.request import Request


class QueueFull(RuntimeError):
    """The waiting queue is at `max_queue`: the caller should retry later (HTTP 429 + Retry-After)."""


class Scheduler:
    """Waiting requests by owner; thread-safe, since submitters and the stepping thread share it."""

    def __init__(self, max_queue: int, max_rows_per_owner: int = 0) -> None:
        self.max_queue = max_queue
        self.max_rows_per_owner = max_rows_per_owner
        self._lock = threading.Lock()
        self._waiting: dict[str, deque[Request]] = {}
        self._size = 0
        self._last_served: dict[str, int] = {}  # owner -> admission counter when it last got a slot
        self._running_by_owner: dict[str, int] = {}
        self._clock = itertools.count()

    def add(self, request: Request) -> None:
        with self._lock:
            if self._size >= self.max_queue:
                raise QueueFull(f"{self._size} requests are waiting (max_queue={self.max_queue})")
            self._waiting.setdefault(request.owner, deque()).append(request)
            self._size += 1

    def remove(self, request: Request) -> bool:
        """Take a waiting request out of the queue; False when it is not waiting (admitted or gone)."""
        with self._lock:
            queue = self._waiting.get(request.owner)
            if queue is None or request not in queue:
                return False
            queue.remove(request)
            self._size -= 1
            if not queue:
                del self._waiting[request.owner]
            return True

    def admit(self, free_slots: int) -> list[Request]:
        """Up to `free_slots` waiting requests, round-robin over owners under their per-owner cap."""
        admitted: list[Request] = []
        with self._lock:
            while len(admitted) < free_slots:
                owners = [
                    o
                    for o in self._waiting
                    if not self.max_rows_per_owner
                    or self._running_by_owner.get(o, 0) < self.max_rows_per_owner
                ]
                if not owners:
                    break
                owner = min(owners, key=lambda o: self._last_served.get(o, -1))
                queue = self._waiting[owner]
                admitted.append(queue.popleft())
                self._size -= 1
                if not queue:
                    del self._waiting[owner]
                self._last_served[owner] = next(self._clock)
                self._running_by_owner[owner] = self._running_by_owner.get(owner, 0) + 1
        return admitted

    def release(self, request: Request) -> None:
        """A running request finished: its owner holds one slot fewer."""
        with self._lock:
            left = self._running_by_owner[request.owner] - 1
            if left:
                self._running_by_owner[request.owner] = left
            else:
                del self._running_by_owner[request.owner]
                # forget idle owners so that many one-off API keys do not grow this dict forever
                if request.owner not in self._waiting:
                    self._last_served.pop(request.owner, None)

    @property
    def waiting(self) -> int:
        return self._size

    @property
    def running_owners(self) -> int:
        return len(self._running_by_owner)
