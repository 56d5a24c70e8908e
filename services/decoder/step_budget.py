"""How many prompt tokens a step that carries decoding streams may prefill: measured once at start-up.

A step's time grows with the tokens it computes, roughly `fixed + per_token x tokens` (the fixed part is reading
the weights once, the rest the prompt's compute). Streams that are decoding wait for the whole step, so with
`--step-time-budget-ms` a step that carries them prefills at most the tokens that fit in it. A step without
decoding streams keeps the whole `--max-num-batched-tokens` budget (nothing waits on it).

The model is fitted on prefill passes timed alone, which is the GPU's part of a step only: in the serving process
a mixed step also waits for the host (eager launches, the GIL shared with the gRPC threads), so on the H200 such
steps took far longer than the budget (docs/benchmarks.md, goodput) and the budget is off by default.
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


def prefill_tokens_while_decoding(time_pass_ms: Callable[[int], float], budget_ms: float, max_tokens: int,
                                  min_tokens: int) -> int:
    """The scheduler's `max_prefill_tokens_while_decoding` for this model on this device (0: no bound)."""
    if budget_ms <= 0:
        return 0
    cost = measure_step_cost(time_pass_ms, max_tokens)
    tokens = cost.tokens_within(budget_ms, min_tokens, max_tokens)
    log.info("steps with decoding streams prefill at most %d tokens (a pass: %.1f ms + %.4f ms a token; "
             "budget %.0f ms)", tokens, cost.fixed_ms, cost.per_token_ms, budget_ms)
    return tokens
