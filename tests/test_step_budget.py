"""The decoder's sizing rules: the prefill chunk of a step with decoding streams from measured pass times and then
from the steps the engine runs, the KV budget of a process sharing a GPU, and the default number of sequences."""

from __future__ import annotations

import pytest

from services.decoder.factory import GIB, auto_max_num_seqs, gpu_kv_budget
from services.decoder.step_budget import StepBudget, StepCost, measure_step_cost, step_budget


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
    assert step_budget(linear_pass(6.0, 0.03), 40.0, 8192, 256).tokens == int(34 / 0.03)
    assert step_budget(linear_pass(6.0, 0.03), 500.0, 8192, 256).tokens == 8192   # capped by the step
    assert step_budget(linear_pass(60.0, 0.03), 40.0, 8192, 256).tokens == 256    # never stalled
    assert step_budget(linear_pass(6.0, 0.03), 0.0, 8192, 256) is None            # no bound


def test_the_bound_follows_the_steps_the_engine_runs():
    """Started from passes timed alone (6 ms + 30 us a token), in a process whose steps take twice that and 8 ms
    of host work more, the bound comes down to what keeps those steps within the budget."""
    budget = StepBudget(50.0, 256, 8192, StepCost(6.0, 0.03))
    assert budget.tokens == int(44 / 0.03)

    def real_step_ms(num_prompt_tokens: int) -> float:
        return 2 * (6.0 + 0.03 * num_prompt_tokens) + 8.0

    for _ in range(60):   # decode-only steps and mixed ones, each as large as the bound allows
        budget.observe(0, 32, real_step_ms(0))
        budget.observe(budget.tokens, 32, real_step_ms(budget.tokens))
    assert budget.fixed_ms == pytest.approx(20.0, abs=0.01)
    assert real_step_ms(budget.tokens) == pytest.approx(50.0, abs=0.5)   # 500 tokens
    # Longer contexts make decoding itself slower: the prompt gets what is left of the budget.
    for _ in range(60):
        budget.observe(0, 32, real_step_ms(0) + 10.0)
        budget.observe(budget.tokens, 32, real_step_ms(budget.tokens) + 10.0)
    assert real_step_ms(budget.tokens) + 10.0 == pytest.approx(50.0, abs=0.5)
    # Decoding alone over the budget: prompts still get their smallest chunk.
    for _ in range(30):
        budget.observe(0, 32, 70.0)
    assert budget.tokens == 256


def test_steps_nobody_waited_on_or_too_small_to_tell_change_nothing():
    budget = StepBudget(50.0, 256, 8192, StepCost(6.0, 0.03))
    before = budget.tokens
    budget.observe(4000, 0, 500.0)    # a prefill step without decoding streams
    budget.observe(16, 8, 400.0)      # a prompt's last few tokens
    assert budget.tokens == before
    unknown = StepBudget(50.0, 256, 8192)   # nothing timed at start-up (CPU): no bound until both are seen
    unknown.observe(1000, 8, 90.0)
    assert unknown.tokens == 8192
    unknown.observe(0, 8, 10.0)
    unknown.observe(1000, 8, 90.0)
    assert unknown.tokens == int(40 / 0.08)


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


def test_the_engine_moves_the_bound_by_its_steps(tiny_model):
    """A budget no step can keep (a microsecond): once a decode-only and a mixed step have been read, a prompt
    that arrives while a stream decodes is prefilled in the smallest chunks, and the stream decodes every step."""
    from services.decoder.weights import load_decoder
    from tests.test_engine import CPU, make_engine, make_request
    from services.decoder.sequence import SamplingParams
    import torch
    engine = make_engine(load_decoder(tiny_model, torch.float32, CPU), "--step-time-budget-ms", "0.001",
                         "--max-num-batched-tokens", "1024")
    assert engine.scheduler.max_prefill_tokens_while_decoding == 1024   # nothing known yet on CPU
    stream = make_request(1, num_prompt=8, num_images=0, sampling=SamplingParams(40, ignore_eos=True))
    engine.add(stream, lambda output: None)
    engine.step()
    engine.step()   # the prompt, then a step of decoding alone
    prompt = make_request(2, num_prompt=2000, num_images=0, sampling=SamplingParams(2))
    engine.add(prompt, lambda output: None)
    computed = []
    while not prompt.is_prompt_computed:
        before = stream.num_output_tokens
        engine.step()
        assert stream.num_output_tokens == before + 1
        computed.append(prompt.num_computed_tokens)
    chunks = [b - a for a, b in zip([0, *computed], computed)]
    assert chunks[0] == 1023 and engine.stats().max_prefill_tokens_while_decoding == 256
    assert all(chunk == 256 for chunk in chunks[1:-1]) and chunks[-1] <= 256
