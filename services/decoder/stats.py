"""What the engine has done and holds, for metrics and the Info RPC."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StepCounters:
    num_steps: int = 0               # forward passes read so far
    num_generated_tokens: int = 0    # tokens sampled so far
    num_computed_tokens: int = 0     # tokens run through the model so far (prompts, recomputation, decode)
    num_preempted: int = 0           # preemptions so far
    last_batch_size: int = 0         # sequences in the latest forward pass
    num_overlapped_steps: int = 0    # steps launched before the tokens of the step before them were read

    def count(self, batch, num_generated: int) -> None:
        """A step read: `batch` its ScheduledBatch, `num_generated` the sequences that gained a token."""
        self.num_steps += 1
        self.num_generated_tokens += num_generated
        self.num_computed_tokens += batch.num_tokens
        self.num_preempted += len(batch.preempted)
        self.last_batch_size = len(batch.chunks)


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int             # sequences holding KV blocks
    num_waiting: int             # admitted, waiting for a slot or blocks
    num_free_blocks: int
    num_blocks: int
    num_steps: int
    num_generated_tokens: int
    num_computed_tokens: int
    num_preempted: int
    last_batch_size: int
    num_failed_steps: int        # forward passes that raised so far
    is_healthy: bool             # no forward pass has failed since the last one that worked
    num_prefix_queried_tokens: int = 0   # prompt tokens of admitted sequences
    num_prefix_hit_tokens: int = 0       # of those, tokens whose KV came from the prefix cache
    num_prefix_cached_blocks: int = 0    # blocks registered in the prefix cache (in use or not)
    num_overlapped_steps: int = 0
    max_prefill_tokens_while_decoding: int = 0   # the step-time budget's bound now; 0: none

    @staticmethod
    def of(scheduler, counters: StepCounters, failures) -> EngineStats:
        blocks = scheduler.block_manager
        return EngineStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            num_free_blocks=blocks.num_free_blocks, num_blocks=blocks.num_blocks, num_steps=counters.num_steps,
            num_generated_tokens=counters.num_generated_tokens, num_computed_tokens=counters.num_computed_tokens,
            num_preempted=counters.num_preempted, last_batch_size=counters.last_batch_size,
            num_failed_steps=failures.num_failed_steps, is_healthy=failures.is_healthy,
            num_prefix_queried_tokens=blocks.num_queried_tokens, num_prefix_hit_tokens=blocks.num_hit_tokens,
            num_prefix_cached_blocks=blocks.num_cached_blocks, num_overlapped_steps=counters.num_overlapped_steps,
            max_prefill_tokens_while_decoding=scheduler.max_prefill_tokens_while_decoding)
