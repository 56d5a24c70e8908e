"""What other threads hand the engine thread: requests, counted by the admission control from their reservation
on, cancellations and the stop, taken up between steps (engine.py)."""

from __future__ import annotations

import queue
from collections.abc import Iterator

from services.decoder.admission import Admission
from services.decoder.outputs import EngineOutput, Sink
from services.decoder.sequence import FinishReason, Sequence


class Inbox:
    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def add(self, seq: Sequence, sink: Sink, is_reserved: bool = False) -> None:
        """`is_reserved`: the caller counted the request with `admission.reserve()` before it cost anything (its
        image features are fetched after that); each reservation ends in add() or `admission.release()`."""
        if not is_reserved:
            self.admission.reserve()
        if not self.admission.submit(lambda: self._queue.put(("add", seq, sink))):
            # The engine closed after the reservation: nobody would take the request up, so it ends here.
            self.admission.release()
            sink(EngineOutput(seq.request_id, [], FinishReason.CANCELLED, "decoder engine stopped"))

    def abort(self, request_id: str) -> None:
        self._queue.put(("abort", request_id, None))

    def stop(self) -> None:
        self._queue.put(("stop", None, None))

    def wait(self, timeout_s: float) -> tuple | None:
        """The next item, waiting for it at most `timeout_s`; None if none came."""
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def drain(self) -> Iterator[tuple]:
        while True:
            try:
                yield self._queue.get_nowait()
            except queue.Empty:
                return
