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
    num_running: int             # sequences holding KV blocks
    num_waiting: int             # admitted, waiting for a slot or blocks
    num_free_blocks: int
    num_blocks: int
    num_steps: int               # forward passes so far
    num_generated_tokens: int    # tokens sampled so far
    num_computed_tokens: int     # tokens run through the model so far (prompts, recomputation, decode)
    num_preempted: int           # preemptions so far
    last_batch_size: int         # sequences in the latest forward pass


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
        self._counters = {"num_steps": 0, "num_generated_tokens": 0, "num_computed_tokens": 0, "num_preempted": 0,
                          "last_batch_size": 0}

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
                           bm.num_blocks, **self._counters)

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
            if self.scheduler.num_unfinished == 0:
                try:
                    self._apply(self._inbox.get(timeout=0.5))  # idle: sleep until work arrives
                except queue.Empty:
                    continue
            self.step()
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.finish(seq, FinishReason.CANCELLED)
            self._emit(seq, [])

    def _apply(self, item: tuple) -> None:
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

    def step(self) -> None:
        """Applies arrivals and cancellations, then schedule -> run -> postprocess."""
        while True:
            try:
                self._apply(self._inbox.get_nowait())
            except queue.Empty:
                break
        if self._is_stopping:
            return
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
        advanced = self.scheduler.postprocess(batch, sampled)
        for seq in advanced:
            self._emit(seq, seq.token_ids[-1:])
        counters = self._counters
        counters["num_steps"] += 1
        counters["num_generated_tokens"] += len(advanced)
        counters["num_computed_tokens"] += batch.num_tokens
        counters["num_preempted"] += len(batch.preempted)
        counters["last_batch_size"] = len(batch.chunks)

    def _emit(self, seq: Sequence, token_ids: list[int], error: str = "") -> None:
        sink = self._sinks.get(seq.request_id)
        if seq.is_finished:
            self._sinks.pop(seq.request_id, None)
            with self._lock:
                self._num_unfinished -= 1
        if sink is not None:
            sink(EngineOutput(seq.request_id, token_ids, seq.finish_reason, error))
