"""The decoder engine: one thread owns the model and loops over `step()`, which reads top to bottom:

    drain_inbox()          requests and cancellations that arrived, applied between steps
    schedule()             the next batch: the step in flight continued, or a full decision once it is read
    launch(batch)          its forward pass queued on the device
    process(previous)      the step before read and its tokens emitted while the device runs this one; then this
                           step's sampling queued, every token it depends on being known by then

With `overlap`, a decode step is queued on the device before the tokens of the one in flight are read
(Scheduler.continue_decoding), so the host's work of a step (reading and emitting tokens, scheduling, preparing
inputs) runs while the device computes. Steps that prefill, admit or preempt are scheduled after the step in
flight has been read. Without it every step is read as soon as it is sampled.

Each request has a sink that receives its outputs from the engine thread, and every request ends in
`Outputs.finish()` (outputs.py), which sends its last output with the finish reason: a sequence that ends by its
tokens, is cancelled, fails, or is added as the engine closes. Failed forward passes are the FailurePolicy's to
judge (failures.py).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

from services.decoder.admission import Admission
from services.decoder.failures import FailurePolicy, probe_sequence
from services.decoder.inbox import Inbox
from services.decoder.model_runner import LaunchedStep, ModelRunner
from services.decoder.outputs import Outputs, Sink
from services.decoder.scheduler import ScheduledBatch, Scheduler
from services.decoder.sequence import FinishReason, Sequence
from services.decoder.stats import EngineStats, StepCounters
from services.decoder.step_budget import StepBudget

PROBE_PREFIX = "engine-probe#"

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, max_queued: int, *, eos_token_id: int,
                 probe_token_id: int, max_forward_failures: int = 3, retry_interval_s: float = 1.0,
                 overlap: bool = False, step_budget: StepBudget | None = None) -> None:
        """`max_queued`: requests waiting for a slot beyond max_num_seqs before we refuse; `probe_token_id`: a
        one-token prompt any checkpoint can run (BOS); `step_budget`: moves the scheduler's prefill bound for steps
        with decoding streams by how long the steps take."""
        self.runner = runner
        self.scheduler = scheduler
        self.admission = Admission(scheduler.config.max_num_seqs, max_queued)
        self.failures = FailurePolicy(max_forward_failures, retry_interval_s)
        self.eos_token_id = eos_token_id
        self.probe_token_id = probe_token_id
        self.overlap = overlap
        self.step_budget = step_budget
        self._last_read_s: float | None = None   # when the last step was read; None after idling
        self._logged_bound = scheduler.max_prefill_tokens_while_decoding
        self.counters = StepCounters()
        self._in_flight: LaunchedStep | None = None   # launched and sampled, tokens not read yet
        self.inbox = Inbox(self.admission)
        self.outputs = Outputs(scheduler, self.admission)
        self._thread: threading.Thread | None = None
        self._is_stopping = False
        self._is_failed = False
        self._probes = itertools.count()

    # -- called from any thread ---------------------------------------------------------------------------------

    def add(self, seq: Sequence, sink: Sink, is_reserved: bool = False) -> None:
        if seq.eos_token_id is None:
            seq.eos_token_id = self.eos_token_id
        self.inbox.add(seq, sink, is_reserved)

    def abort(self, request_id: str) -> None:
        self.inbox.abort(request_id)

    def stats(self) -> EngineStats:
        return EngineStats.of(self.scheduler, self.counters, self.failures)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends every request as cancelled and stops the thread."""
        self.inbox.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- engine thread ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._is_stopping:
            if self.scheduler.num_unfinished == 0 and self._in_flight is None:
                self._last_read_s = None
                item = self.inbox.wait(timeout_s=0.5)   # idle: sleep until work arrives
                if item is None:
                    continue
                self._apply(item)
            self.step()
            if not self._is_stopping:
                self.failures.pause()
        self._close()
        if self._is_failed:
            self.failures.on_fatal()

    def step(self) -> None:
        self.drain_inbox()
        if self._is_stopping:
            return
        batch, previous = self.schedule()
        if batch is None:
            return
        launched = self.launch(batch, previous)
        if launched is not None:
            self.process(previous, launched)

    def drain_inbox(self) -> None:
        for item in self.inbox.drain():
            self._apply(item)

    def schedule(self) -> tuple[ScheduledBatch | None, LaunchedStep | None]:
        """The next batch, and the step in flight it continues (None: there was none, or it was read first)."""
        previous, self._in_flight = self._in_flight, None
        if previous is not None and self.overlap:
            batch = self.scheduler.continue_decoding(previous.batch)
            if batch is not None:
                return batch, previous
        if previous is not None and not self._read(previous):
            return None, None
        batch = self.scheduler.schedule()
        for seq in batch.finished:   # longer than the whole cache
            self.outputs.finish(seq, seq.finish_reason)
        return (batch or None), None

    def launch(self, batch: ScheduledBatch, previous: LaunchedStep | None) -> LaunchedStep | None:
        try:
            return self.runner.launch(batch, previous)
        except Exception as error:  # noqa: BLE001 - the batch's streams end, the engine goes on
            # a step launched before the failure proves nothing about the device: its sequences end too
            self._fail([batch] if previous is None else [previous.batch, batch], error)
            return None

    def process(self, previous: LaunchedStep | None, launched: LaunchedStep) -> None:
        """Reads the step before (the one `launched` continued), then queues `launched`'s sampling."""
        if previous is not None:
            self.counters.num_overlapped_steps += 1
            if not self._read(previous, following=launched):
                return
        try:
            self.runner.sample(launched)
        except Exception as error:  # noqa: BLE001
            self._fail([launched.batch], error)
            return
        if self.overlap:
            self._in_flight = launched
        else:
            self._read(launched)

    def _apply(self, item: tuple) -> None:
        kind, payload, sink = item
        if kind == "add":
            self.outputs.open(payload, sink)
            self.scheduler.add(payload)
        elif kind == "abort":
            seq = self.scheduler.abort(payload)
            if seq is not None:
                self.outputs.finish(seq, FinishReason.CANCELLED)
        else:
            self._is_stopping = True

    def _read(self, step: LaunchedStep, following: LaunchedStep | None = None) -> bool:
        """Reads a launched step's tokens and emits them; False if the step failed (`following`, queued after
        it, fails with it: its inputs are lost)."""
        try:
            sampled, logprobs = self.runner.collect(step)
        except Exception as error:  # noqa: BLE001
            self._fail([step.batch] + ([following.batch] if following is not None else []), error)
            return False
        self.failures.succeeded()
        self.counters.count(step.batch, self.outputs.emit_step(step.batch, sampled, logprobs))
        self._time_step(step.batch)
        return True

    def _time_step(self, batch: ScheduledBatch) -> None:
        """A step read: the interval since the one before goes to the step budget, which moves the bound."""
        now = time.perf_counter()
        if self.step_budget is not None and self._last_read_s is not None:
            num_decoding = batch.num_decoding
            self.step_budget.observe(batch.num_tokens - num_decoding, num_decoding, 1000 * (now - self._last_read_s))
            bound = self.scheduler.max_prefill_tokens_while_decoding = self.step_budget.tokens
            if not 0.8 <= bound / max(self._logged_bound, 1) <= 1.25:   # logged as it moves, not every step
                log.info("steps with decoding streams now prefill at most %d tokens (%.1f ms + %.4f ms a token)",
                         bound, self.step_budget.fixed_ms or 0.0, self.step_budget.per_token_ms or 0.0)
                self._logged_bound = bound
        self._last_read_s = now

    def _fail(self, batches: list[ScheduledBatch], error: Exception) -> None:
        num_ended = self.outputs.fail(batches, f"forward pass failed: {type(error).__name__}")
        self._in_flight = None
        self.scheduler.block_manager.reset_prefix_cache()   # a faulty device may have written anything anywhere
        if self.failures.failed(error, num_ended):
            self._is_failed = self._is_stopping = True
        elif self.scheduler.num_unfinished == 0:
            self._add_probe()

    def _add_probe(self) -> None:
        """A one-token request of the engine's own: the next forward pass, to find out whether it works again."""
        seq = probe_sequence(f"{PROBE_PREFIX}{next(self._probes)}", self.probe_token_id, self.eos_token_id)
        self.admission.reserve(force=True)
        self.outputs.open(seq, lambda output: None)
        self.scheduler.add(seq)

    def _close(self) -> None:
        """Ends every request: those running and waiting, and those still in the inbox (nobody else would)."""
        self.admission.close()
        self.drain_inbox()
        if self._is_failed:
            self.outputs.end_all(FinishReason.ERROR, "decoder engine stopped after repeated failures")
        else:
            self.outputs.end_all(FinishReason.CANCELLED)
