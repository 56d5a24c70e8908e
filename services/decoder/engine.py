"""The decoder engine: one thread owns the model and loops `step()` = schedule -> run -> postprocess.

Requests and cancellations arrive through a thread-safe inbox and are applied between steps, so sequences join
and leave the batch at token granularity. Each request has a sink (a callable) that receives its outputs from
the engine thread; decoder/service.py bridges sinks to asyncio.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from services.decoder.model_runner import ModelRunner
from services.decoder.scheduler import Scheduler
from services.decoder.sequence import FinishReason, Sequence
from shared.errors import Overloaded

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineOutput:
    request_id: str
    token_ids: list[int]                 # new tokens since the previous output
    finish_reason: FinishReason | None   # set on the last output of the request
    error: str = ""                      # with FinishReason.ERROR: what failed


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int


Sink = Callable[[EngineOutput], None]


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, max_queued: int) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.max_queued = max_queued   # sequences waiting for a slot beyond max_num_seqs before we refuse
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._lock = threading.Lock()
        self._num_unfinished = 0       # added and not yet finished; guarded by _lock
        self._thread: threading.Thread | None = None
        self._is_stopping = False

    # -- called from any thread ---------------------------------------------------------------------------------

    def add(self, seq: Sequence, sink: Sink) -> None:
        with self._lock:
            if self._num_unfinished >= self.scheduler.config.max_num_seqs + self.max_queued:
                raise Overloaded(f"decoder queue is full ({self._num_unfinished} requests); retry later")
            self._num_unfinished += 1
        self._inbox.put(("add", seq, sink))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))

    def stats(self) -> EngineStats:
        bm = self.scheduler.block_manager
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), bm.num_free_blocks,
                           bm.num_blocks)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends every request as cancelled and stops the thread."""
        self._inbox.put(("stop", None, None))
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- engine thread --------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._is_stopping:
            self._drain_inbox(block=self.scheduler.num_unfinished == 0)
            if self.scheduler.num_unfinished:
                self.step()
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.finish(seq, FinishReason.CANCELLED)
            self._emit(seq, [])

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while True:
            kind, payload, sink = item
            if kind == "add":
                self._sinks[payload.request_id] = sink
                self.scheduler.add(payload)
            elif kind == "abort":
                seq = self.scheduler.abort(payload)
                if seq is not None:
                    self._emit(seq, [])
            else:
                self._is_stopping = True
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def step(self) -> None:
        batch = self.scheduler.schedule()
        if not batch:
            return
        try:
            sampled = self.runner.run(batch)
        except Exception as error:  # noqa: BLE001 - the batch's streams end, the engine goes on
            log.exception("forward pass failed; ending %d sequences", len(batch.chunks))
            for chunk in batch.chunks:
                self.scheduler.finish(chunk.seq, FinishReason.ERROR)
                self._emit(chunk.seq, [], error=f"forward pass failed: {type(error).__name__}")
            return
        for seq in self.scheduler.postprocess(batch, sampled):
            self._emit(seq, seq.token_ids[-1:])

    def _emit(self, seq: Sequence, token_ids: list[int], error: str = "") -> None:
        sink = self._sinks.get(seq.request_id)
        if seq.is_finished:
            self._sinks.pop(seq.request_id, None)
            with self._lock:
                self._num_unfinished -= 1
        if sink is not None:
            sink(EngineOutput(seq.request_id, token_ids, seq.finish_reason, error))
