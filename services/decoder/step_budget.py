"""How many prompt tokens a step that carries decoding streams may prefill, within a time budget.

A step's time grows with the tokens it computes, roughly `fixed + per_token x tokens` (the fixed part is reading
the weights once, the rest the prompt's compute). Streams that are decoding wait for the whole step, so with
`--step-time-budget-ms` a step that carries them prefills at most the tokens that fit in it. A step without
decoding streams keeps the whole `--max-num-batched-tokens` budget (nothing waits on it).

The start-up measurement times prefill passes alone, which is the GPU's part of a step only: in the serving
process a mixed step also waits for the host (eager launches, the GIL shared with the gRPC threads), and on the
H200 such steps took far longer than a budget set from it (docs/benchmarks.md, goodput). So `StepBudget` follows
the steps the engine really runs: the interval between two steps' reads, which is what a decoding stream waits
for between its tokens.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

SMALL_PASS_TOKENS = 256
LARGE_PASS_TOKENS = 2048
REPEATS = 3
SMOOTHING = 0.2          # weight of a step's sample in the running estimates
MIN_SAMPLE_TOKENS = 64   # prompt tokens a step needs for its interval to tell the cost of one


@dataclass(frozen=True, slots=True)
class StepCost:
    fixed_ms: float        # a pass of (nearly) no tokens
    per_token_ms: float    # each prompt token more

    def tokens_within(self, budget_ms: float, min_tokens: int, max_tokens: int) -> int:
        """Tokens a pass may compute to take at most `budget_ms`, within [min_tokens, max_tokens]: a budget below
        the fixed cost still prefills `min_tokens`, so prompts are never stalled outright."""
        if self.per_token_ms <= 0:
            return max_tokens
        fitting = int((budget_ms - self.fixed_ms) / self.per_token_ms)
        return max(min_tokens, min(fitting, max_tokens))


def measure_step_cost(time_pass_ms: Callable[[int], float], max_tokens: int) -> StepCost:
    """The cost model from timed prefill passes of two sizes (`time_pass_ms(tokens)`: one pass, synchronized),
    the median of a few each."""
    small = min(SMALL_PASS_TOKENS, max_tokens)
    large = min(LARGE_PASS_TOKENS, max_tokens)
    small_ms = statistics.median(time_pass_ms(small) for _ in range(REPEATS))
    if large <= small:
        return StepCost(small_ms, 0.0)
    large_ms = statistics.median(time_pass_ms(large) for _ in range(REPEATS))
    per_token = max((large_ms - small_ms) / (large - small), 0.0)
    return StepCost(max(small_ms - per_token * small, 0.0), per_token)


def time_prompt_pass_ms(runner, num_tokens: int) -> float:
    """One prefill pass of the model runner's (CUDA), from queue to finish."""
    import torch   # the rest of this module is plain arithmetic

    torch.cuda.synchronize(runner.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    runner.prompt_pass(num_tokens)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


class StepBudget:
    """The prompt tokens a step with decoding streams may prefill, kept within `budget_ms` by the steps the engine
    runs. A step's interval (from the read of the step before to its own: host work, launches and the device's
    time) is modelled as `fixed + per_token x prompt tokens`; the fixed part follows the steps that only decode, the
    per-token part those that also prefill, each a running average. They start from the passes timed at start-up
    (CUDA); without them there is no bound until both have been seen."""

    def __init__(self, budget_ms: float, min_tokens: int, max_tokens: int, start: StepCost | None = None) -> None:
        self.budget_ms, self.min_tokens, self.max_tokens = budget_ms, min_tokens, max_tokens
        self.fixed_ms = start.fixed_ms if start is not None else None
        self.per_token_ms = start.per_token_ms if start is not None else None

    @property
    def tokens(self) -> int:
        """The scheduler's bound now (max_tokens while the cost is not known yet)."""
        if self.fixed_ms is None or self.per_token_ms is None:
            return self.max_tokens
        return StepCost(self.fixed_ms, self.per_token_ms).tokens_within(self.budget_ms, self.min_tokens,
                                                                         self.max_tokens)

    def observe(self, num_prompt_tokens: int, num_decoding: int, interval_ms: float) -> None:
        """A step read: its prompt tokens, its decoding rows and the interval since the step before was read."""
        if num_decoding == 0:
            return   # nobody waited on it
        if num_prompt_tokens == 0:
            self.fixed_ms = _averaged(self.fixed_ms, interval_ms)
        elif num_prompt_tokens >= MIN_SAMPLE_TOKENS and self.fixed_ms is not None:
            self.per_token_ms = _averaged(self.per_token_ms,
                                          max(interval_ms - self.fixed_ms, 0.0) / num_prompt_tokens)


def _averaged(average: float | None, sample: float) -> float:
    return sample if average is None else average + SMOOTHING * (sample - average)


def step_budget(time_pass_ms: Callable[[int], float] | None, budget_ms: float, max_tokens: int,
                min_tokens: int) -> StepBudget | None:
    """The engine's step budget for this model on this device (None: no bound); `time_pass_ms` times a prefill
    pass (CUDA), None where nothing is measured at start-up."""
    if budget_ms <= 0:
        return None
    start = measure_step_cost(time_pass_ms, max_tokens) if time_pass_ms is not None else None
    budget = StepBudget(budget_ms, min_tokens, max_tokens, start)
    if start is not None:
        log.info("steps with decoding streams prefill at most %d tokens to start with (a pass: %.1f ms + %.4f ms a "
                 "token; budget %.0f ms), then as the steps run", budget.tokens, start.fixed_ms, start.per_token_ms,
                 budget_ms)
    return budget
