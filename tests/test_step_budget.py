"""The decoder's sizing rules at start-up: the prefill chunk of a step with decoding streams from measured pass
times, the KV budget of a process sharing a GPU, and the default number of sequences."""

from __future__ import annotations

import pytest

from services.decoder.factory import GIB, auto_max_num_seqs, gpu_kv_budget
from services.decoder.step_budget import StepCost, measure_step_cost, prefill_tokens_while_decoding


def linear_pass(fixed_ms: float, per_token_ms: float, calls: list[int] | None = None):
    def time_pass_ms(num_tokens: int) -> float:
        if calls is not None:
            calls.append(num_tokens)
        return fixed_ms + per_token_ms * num_tokens
    return time_pass_ms


def test_the_cost_model_is_fitted_from_two_pass_sizes():
    calls = []
    cost = measure_step_cost(linear_pass(6.0, 0.03, calls), max_tokens=8192)
    assert cost.fixed_ms == pytest.approx(6.0) and cost.per_token_ms == pytest.approx(0.03)
    assert sorted(set(calls)) == [256, 2048] and len(calls) == 6     # a median of three passes of each size


def test_the_chunk_fills_the_budget_beyond_the_fixed_cost():
    # the H200's bf16 shape: ~6 ms to read the weights, ~30 us a prompt token
    assert prefill_tokens_while_decoding(linear_pass(6.0, 0.03), 40.0, 8192, 256) == int(34 / 0.03)
    assert prefill_tokens_while_decoding(linear_pass(6.0, 0.03), 500.0, 8192, 256) == 8192   # capped by the step
    assert prefill_tokens_while_decoding(linear_pass(60.0, 0.03), 40.0, 8192, 256) == 256    # never stalled
    assert prefill_tokens_while_decoding(linear_pass(6.0, 0.03), 0.0, 8192, 256) == 0        # no bound


def test_a_pass_whose_time_does_not_grow_leaves_the_whole_step():
    assert StepCost(5.0, 0.0).tokens_within(40.0, 256, 8192) == 8192
    assert measure_step_cost(linear_pass(5.0, 0.0), 128) == StepCost(5.0, 0.0)   # too small a step to fit two


def test_two_decoders_sharing_a_gpu_each_get_their_share_beyond_their_weights():
    total, weights, context = 141 * GIB, 23 * GIB, GIB // 2
    reserve = 3 * GIB
    first = gpu_kv_budget(total, total - weights - context, weights, 0.42, reserve)
    assert first == pytest.approx(0.42 * total - weights - reserve, rel=1e-6)     # ~33 GiB, not what is left
    # the second starts once the first holds its share: it takes its own, within what is free
    free = total - (weights + first + reserve + context) - weights - context
    second = gpu_kv_budget(total, free, weights, 0.42, reserve)
    assert second == first
    # a third would not fit: it gets what is free only
    free_after = free - (weights + second + reserve)
    assert gpu_kv_budget(total, free_after, weights, 0.42, reserve) == int(free_after) - reserve


def test_the_default_number_of_sequences_follows_the_kv_cache():
    assert auto_max_num_seqs(653_696) == 255            # bf16 KV of one H200 decoder
    assert auto_max_num_seqs(1_374_944) == 256          # fp8 KV: capped
    assert auto_max_num_seqs(57_152) == 22
    assert auto_max_num_seqs(1_000) == 16               # a small cache still holds several short requests
