"""What each request receives from the engine thread: its sink (a callable; decoder/service.py bridges sinks to
asyncio), the tokens of each step as they are read, and one last output with the finish reason. `finish()` is the
one way a request ends, whatever ends it (its tokens, a cancel, a failure, the engine closing), and it sends that
last output exactly once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.decoder.admission import Admission
from services.decoder.scheduler import ScheduledBatch, Scheduler
from services.decoder.sequence import FinishReason, Sequence
from shared.generation import Logprobs


@dataclass(frozen=True, slots=True)
class EngineOutput:
    request_id: str
    token_ids: list[int]                 # new tokens since the previous output
    finish_reason: FinishReason | None   # set on the last output of the request
    error: str = ""                      # with FinishReason.ERROR: what failed
    logprobs: tuple[Logprobs, ...] = ()  # one per token, where the sequence asked for them
    num_cached_prompt_tokens: int = 0    # on the last output: prompt tokens the prefix cache supplied


Sink = Callable[[EngineOutput], None]


class Outputs:
    def __init__(self, scheduler: Scheduler, admission: Admission) -> None:
        self.scheduler = scheduler
        self.admission = admission   # a request's reservation ends with its last output
        self._sinks: dict[str, Sink] = {}

    def open(self, seq: Sequence, sink: Sink) -> None:
        self._sinks[seq.request_id] = sink

    def finish(self, seq: Sequence, reason: FinishReason, token_ids: list[int] | None = None, error: str = "",
               logprobs: tuple[Logprobs, ...] = ()) -> None:
        """Ends a sequence (if it has not ended yet) and sends its last output."""
        self.scheduler.finish(seq, reason)
        sink = self._sinks.pop(seq.request_id, None)
        if sink is None:
            return   # its last output went out already
        self.admission.release()
        sink(EngineOutput(seq.request_id, token_ids or [], seq.finish_reason, error, logprobs,
                          seq.num_cached_prompt_tokens))

    def fail(self, batches: list[ScheduledBatch], error: str) -> int:
        """Ends the sequences of failed steps with the error, each once; returns how many it ended (those that
        ended before, cancelled while the step ran, have had their last output)."""
        seqs = {id(chunk.seq): chunk.seq for batch in batches for chunk in batch.chunks if not chunk.seq.is_finished}
        for seq in seqs.values():
            self.finish(seq, FinishReason.ERROR, error=error)
        return len(seqs)

    def end_all(self, reason: FinishReason, error: str = "") -> None:
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.finish(seq, reason, error=error)

    def emit_step(self, batch: ScheduledBatch, sampled: list[int | None], logprobs: list) -> int:
        """Records a read step's tokens and sends each to its sequence's sink; returns the tokens generated."""
        logprobs_of = {id(chunk.seq): entry for chunk, entry in zip(batch.chunks, logprobs) if entry}
        advanced = self.scheduler.postprocess(batch, sampled)
        for seq in advanced:
            token, entry = seq.token_ids[-1], logprobs_of.get(id(seq))
            entries = (entry,) if entry is not None else ()
            if not seq.is_finished and seq.constraint is not None:
                self._advance_format(seq, token)
            if seq.is_finished:
                self.finish(seq, seq.finish_reason, [token], logprobs=entries)
            else:
                self._sinks[seq.request_id](EngineOutput(seq.request_id, [token], None, logprobs=entries))
        return len(advanced)

    def _advance_format(self, seq: Sequence, token: int) -> None:
        """The grammar of the sequence's format takes its new token: once the grammar is complete (it took the
        end-of-sequence token) the sequence ends, even where it ignores the end-of-sequence token."""
        if not seq.constraint.accept(token):   # the mask allowed it: only a broken grammar gets here
            self.scheduler.finish(seq, FinishReason.ERROR)
        elif seq.constraint.is_terminated:
            self.scheduler.finish(seq, FinishReason.STOP)
