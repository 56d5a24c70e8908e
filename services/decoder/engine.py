"""The decoder engine: one thread owns the model and loops `step()` = schedule -> run -> postprocess.

Requests and cancellations arrive through a thread-safe inbox and are applied between steps, so sequences join
and leave the batch at token granularity. Each request has a sink (a callable) that receives its outputs from
the engine thread; decoder/service.py bridges sinks to asyncio.

With `overlap`, a decode step is queued on the device before the tokens of the one in flight are read
(Scheduler.continue_decoding): the host's work of a step (reading and emitting tokens, scheduling, preparing
inputs) runs while the device computes, instead of between its steps. Steps that prefill, admit or preempt are
scheduled after the step in flight has been read, as without it.

A forward pass that fails ends the streams of its batch with FinishReason.ERROR and makes the engine unhealthy
(`on_health(False)`) until a forward pass succeeds again: at once a one-token probe runs (when no request waits
to be the probe), then every `retry_interval_s`. After `max_forward_failures` failures in a row the device is
taken as broken (a CUDA fault poisons its context): the engine ends every request and stops, and `on_fatal` lets
the process exit for its supervisor to restart it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.decoder.model_runner import LaunchedStep, ModelRunner
from services.decoder.scheduler import Scheduler
from services.decoder.sequence import FinishReason, SamplingParams, Sequence
from shared.errors import Overloaded, Unavailable

log = logging.getLogger(__name__)

PROBE_PREFIX = "engine-probe#"
_PROBE_TOKEN_ID = 1   # BOS: a one-token prompt any checkpoint can run


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
    num_failed_steps: int        # forward passes that raised so far
    is_healthy: bool             # no forward pass has failed since the last one that worked
    num_prefix_queried_tokens: int = 0   # prompt tokens of admitted sequences
    num_prefix_hit_tokens: int = 0       # of those, tokens whose KV came from the prefix cache
    num_prefix_cached_blocks: int = 0    # blocks registered in the prefix cache (in use or not)
    num_overlapped_steps: int = 0        # steps launched before the tokens of the step before them were read


Sink = Callable[[EngineOutput], None]


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, max_queued: int,
                 max_forward_failures: int = 3, retry_interval_s: float = 1.0, overlap: bool = False) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.overlap = overlap         # queue the next decode step before reading the one in flight
        self._in_flight: LaunchedStep | None = None   # launched, tokens not read yet
        self.max_queued = max_queued   # sequences waiting for a slot beyond max_num_seqs before we refuse
        self.max_forward_failures = max_forward_failures   # failed forward passes in a row before stopping
        self.retry_interval_s = retry_interval_s           # between probes after the second failure in a row
        # Called from the engine thread: health changes, and the stop after max_forward_failures.
        self.on_health: Callable[[bool], None] = lambda is_healthy: None
        self.on_fatal: Callable[[], None] = lambda: None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._lock = threading.Lock()
        self._num_unfinished = 0       # admitted and not yet finished; guarded by _lock
        self._is_closed = False        # no more admissions (stopped, or failed); guarded by _lock
        self._thread: threading.Thread | None = None
        self._is_stopping = False
        self._is_failed = False
        self._num_failures = 0         # forward passes failed in a row
        self._probes = itertools.count()
        self._counters = {"num_steps": 0, "num_generated_tokens": 0, "num_computed_tokens": 0, "num_preempted": 0,
                          "last_batch_size": 0, "num_failed_steps": 0, "num_overlapped_steps": 0}

    # -- called from any thread ---------------------------------------------------------------------------------

    def reserve(self) -> None:
        """Admission control: counts a request before it costs anything (its image features are fetched after
        this), and refuses it past max_num_seqs + max_queued. Each reservation ends in add() or release()."""
        with self._lock:
            if self._is_closed:
                raise Unavailable("decoder engine is stopping")
            if self._num_unfinished >= self.scheduler.config.max_num_seqs + self.max_queued:
                raise Overloaded(f"decoder queue is full ({self._num_unfinished} requests); retry later")
            self._num_unfinished += 1

    def release(self) -> None:
        """Gives back a reservation whose request never reached add() (it failed or was cancelled before)."""
        with self._lock:
            self._num_unfinished -= 1

    def add(self, seq: Sequence, sink: Sink, is_reserved: bool = False) -> None:
        if not is_reserved:
            self.reserve()
        self._inbox.put(("add", seq, sink))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))

    @property
    def is_healthy(self) -> bool:
        return self._num_failures == 0

    def stats(self) -> EngineStats:
        bm = self.scheduler.block_manager
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), bm.num_free_blocks,
                           bm.num_blocks, **self._counters, is_healthy=self.is_healthy,
                           num_prefix_queried_tokens=bm.num_queried_tokens, num_prefix_hit_tokens=bm.num_hit_tokens,
                           num_prefix_cached_blocks=bm.num_cached_blocks)

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
            if self.scheduler.num_unfinished == 0 and self._in_flight is None:
                try:
                    self._apply(self._inbox.get(timeout=0.5))  # idle: sleep until work arrives
                except queue.Empty:
                    continue
            self.step()
            if self._num_failures > 1 and not self._is_stopping:
                time.sleep(self.retry_interval_s)   # a device that failed twice in a row gets time to recover
        self._close()
        if self._is_failed:
            self.on_fatal()

    def _close(self) -> None:
        """Ends every request: those running and waiting, and those still in the inbox (nobody else would)."""
        with self._lock:
            self._is_closed = True
        while True:
            try:
                kind, payload, sink = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._sinks[payload.request_id] = sink
                self.scheduler.add(payload)
        reason = FinishReason.ERROR if self._is_failed else FinishReason.CANCELLED
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.finish(seq, reason)
            self._emit(seq, [], error="decoder engine stopped after repeated failures" if self._is_failed else "")

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
        previous, batch = self._in_flight, None
        if previous is not None and self.overlap:
            batch = self.scheduler.continue_decoding(previous.batch)
        if batch is None:
            if previous is not None:   # read it first: the scheduler decides on what it sampled
                self._in_flight = None
                if not self._read(previous):
                    return
                previous = None
            batch = self.scheduler.schedule()
            if not batch:
                return
        try:
            launched = self.runner.launch(batch, previous)
        except Exception as error:  # noqa: BLE001 - the batch's streams end, the engine goes on
            self._in_flight = None   # a step launched before the failure proves nothing about the device
            self._fail([batch] if previous is None else [previous.batch, batch], error)
            return
        if not self.overlap:   # nothing is ever continued: read the step at once
            self._read(launched)
            return
        self._in_flight = launched
        if previous is not None:
            self._counters["num_overlapped_steps"] += 1
            self._read(previous)

    def _read(self, step: LaunchedStep) -> bool:
        """Reads a launched step's tokens and emits them; False if the step failed."""
        try:
            sampled = self.runner.collect(step)
        except Exception as error:  # noqa: BLE001
            batches = [step.batch]
            if self._in_flight is not None and self._in_flight is not step:
                batches.append(self._in_flight.batch)   # queued after a failed step: its inputs are lost too
            self._in_flight = None
            self._fail(batches, error)
            return False
        if self._num_failures:
            log.warning("forward pass succeeded again after %d failures: healthy", self._num_failures)
            self._num_failures = 0
            self.on_health(True)
        batch = step.batch
        advanced = self.scheduler.postprocess(batch, sampled)
        for seq in advanced:
            self._emit(seq, seq.token_ids[-1:])
        counters = self._counters
        counters["num_steps"] += 1
        counters["num_generated_tokens"] += len(advanced)
        counters["num_computed_tokens"] += batch.num_tokens
        counters["num_preempted"] += len(batch.preempted)
        counters["last_batch_size"] = len(batch.chunks)
        return True

    def _fail(self, batches: list, error: Exception) -> None:
        # each sequence once; those that ended before (cancelled while the step ran) have had their last output
        seqs = [seq for seq in {id(chunk.seq): chunk.seq for batch in batches for chunk in batch.chunks}.values()
                if not seq.is_finished]
        log.error("forward pass failed (%s: %s); ending %d sequences", type(error).__name__, error,
                  len(seqs), exc_info=error)
        for seq in seqs:
            self.scheduler.finish(seq, FinishReason.ERROR)
            self._emit(seq, [], error=f"forward pass failed: {type(error).__name__}")
        self._counters["num_failed_steps"] += 1
        self.scheduler.block_manager.reset_prefix_cache()   # a faulty device may have written anything anywhere
        self._num_failures += 1
        if self._num_failures == 1:
            self.on_health(False)
        if self._num_failures >= self.max_forward_failures:
            log.error("%d forward passes failed in a row: stopping the engine", self._num_failures)
            self._is_failed = self._is_stopping = True
        elif self.scheduler.num_unfinished == 0:
            self._add_probe()

    def _add_probe(self) -> None:
        """A one-token request of the engine's own: the next forward pass, to find out whether it works again."""
        seq = Sequence(request_id=f"{PROBE_PREFIX}{next(self._probes)}", token_ids=[_PROBE_TOKEN_ID],
                       num_prompt_tokens=1, sampling=SamplingParams(max_tokens=1), max_model_len=2, arrival=-1)
        with self._lock:
            self._num_unfinished += 1
        self._sinks[seq.request_id] = lambda output: None
        self.scheduler.add(seq)

    def _emit(self, seq: Sequence, token_ids: list[int], error: str = "") -> None:
        sink = self._sinks.get(seq.request_id)
        if seq.is_finished:
            self._sinks.pop(seq.request_id, None)
            with self._lock:
                self._num_unfinished -= 1
        if sink is not None:
            sink(EngineOutput(seq.request_id, token_ids, seq.finish_reason, error))
