"""Admission control of the engine: requests are counted from their reservation to their last output, refused past
the engine's capacity (running + queued) and once it closes."""

from __future__ import annotations

import threading
from collections.abc import Callable

from shared.errors import Overloaded, Unavailable


class Admission:
    def __init__(self, max_num_seqs: int, max_queued: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_queued = max_queued   # requests waiting for a slot beyond max_num_seqs before we refuse
        self._lock = threading.Lock()
        self._num_unfinished = 0       # reserved and not yet finished; guarded by _lock
        self._is_closed = False        # no more admissions (stopped, or failed); guarded by _lock

    @property
    def capacity(self) -> int:
        return self.max_num_seqs + self.max_queued

    @property
    def num_unfinished(self) -> int:
        return self._num_unfinished

    def reserve(self, force: bool = False) -> None:
        """Counts a request; `force`: one of the engine's own (a probe), never refused."""
        with self._lock:
            if force:
                self._num_unfinished += 1
                return
            if self._is_closed:
                raise Unavailable("decoder engine is stopping")
            if self._num_unfinished >= self.capacity:
                raise Overloaded(f"decoder queue is full ({self._num_unfinished} requests); retry later")
            self._num_unfinished += 1

    def release(self) -> None:
        with self._lock:
            self._num_unfinished -= 1

    def submit(self, put: Callable[[], None]) -> bool:
        """Runs `put` (handing a request to the engine) unless the engine has closed: False then. Under the lock
        that close() takes, so a request is either handed over before the engine ends what it holds, or not at all."""
        with self._lock:
            if self._is_closed:
                return False
            put()
            return True

    def close(self) -> None:
        with self._lock:
            self._is_closed = True
