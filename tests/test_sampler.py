"""Per-row sampling: greedy, temperature, top-k, top-p, min-p, penalties, logit bias, min_tokens, the grammar's
bitmask, logprobs; seeds that do not depend on the batch; top-k/top-p without a sort equal to a sort."""

from __future__ import annotations

import math
from array import array

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from services.decoder.sampler import _apply_controls, _top_logprobs, sample
from services.decoder.sampling_batch import SamplingBatch, SamplingRow, top_p_mass
from services.decoder.top_k_top_p import find_candidates, gumbel_noise, kept_mask
from services.decoder.top_k_top_p import sample_filtered as _sample_filtered
from shared.sampling import SamplingParams

CPU = torch.device("cpu")
EOS = 2


def batch(params, steps=None, prompts=None, outputs=None, vocab_size=None) -> SamplingBatch:
    """Rows with the given params; a row's output has `steps[i]` tokens (or `outputs[i]`)."""
    steps = steps or [0] * len(params)
    outputs = outputs or [[3] * step for step in steps]
    prompts = prompts or [[1]] * len(params)
    rows = [SamplingRow(p, prompt, output) for p, prompt, output in zip(params, prompts, outputs)]
    return SamplingBatch.build(rows, vocab_size or 1 << 17, EOS, CPU)


def tokens_of(logits, sampling_batch, allowed=None) -> torch.Tensor:
    return sample(logits, sampling_batch, allowed).token_ids


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(3, 50)
    tokens = tokens_of(logits, batch([SamplingParams(5)] * 3, vocab_size=50))
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_a_row_samples_the_same_token_whatever_shares_its_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    params = SamplingParams(5, temperature=0.8, top_p=0.9, top_k=50, seed=1234)
    alone = tokens_of(logits[2:3], batch([params], [7], vocab_size=1000))
    others = [SamplingParams(5), SamplingParams(5, temperature=1.3, seed=9), params, SamplingParams(5, 0.5, seed=2)]
    together = tokens_of(logits, batch(others, [0, 3, 7, 1], vocab_size=1000))
    assert together[2] == alone[0]
    assert together[0] == logits[0].argmax()


def test_seed_and_step_determine_the_noise():
    seeds, steps = torch.tensor([1, 1, 2]), torch.tensor([5, 6, 5])
    noise = gumbel_noise(seeds, steps, 64)
    assert torch.equal(noise, gumbel_noise(seeds, steps, 64))
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.isfinite(noise).all()


def test_sampling_follows_the_softmax_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    params = [SamplingParams(5, temperature=1.0, seed=s) for s in range(4000)]
    tokens = tokens_of(logits.expand(4000, 3), batch(params, vocab_size=3))
    frequencies = torch.bincount(tokens, minlength=3).float() / 4000
    assert torch.allclose(frequencies, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)


def test_top_k_and_top_p_keep_only_the_head():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    top_k = [SamplingParams(5, temperature=1.0, top_k=2, seed=s) for s in range(500)]
    assert set(tokens_of(logits.expand(500, 4), batch(top_k, vocab_size=4)).tolist()) == {0, 1}
    top_p = [SamplingParams(5, temperature=1.0, top_p=0.7, seed=s) for s in range(500)]
    assert set(tokens_of(logits.expand(500, 4), batch(top_p, vocab_size=4)).tolist()) == {0, 1}
    tiny_p = [SamplingParams(5, temperature=1.0, top_p=0.01, seed=s) for s in range(50)]
    assert set(tokens_of(logits.expand(50, 4), batch(tiny_p, vocab_size=4)).tolist()) == {0}


# --- the controls, each against a direct computation -----------------------------------------------------------

def processed(logits, sampling_batch, allowed=None) -> torch.Tensor:
    x = logits.clone()
    _apply_controls(x, sampling_batch, allowed)
    return x


def test_repetition_penalty_equals_transformers_processor():
    torch.manual_seed(1)
    vocab_size = 300
    logits = torch.randn(3, vocab_size) * 4
    prompts = [torch.randint(0, vocab_size, (40,)).tolist() for _ in range(3)]
    outputs = [logits[0].topk(5).indices.tolist(), [], logits[2].topk(8).indices.tolist() * 2]
    penalties = [1.3, 2.0, 0.7]
    params = [SamplingParams(5, repetition_penalty=r) for r in penalties]
    got = processed(logits, batch(params, prompts=prompts, outputs=outputs, vocab_size=vocab_size))
    for row, penalty in enumerate(penalties):
        input_ids = torch.tensor([prompts[row] + outputs[row]])
        expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits[row:row + 1].clone())
        assert torch.equal(got[row], expected[0])
    assert tokens_of(logits, batch(params, prompts=prompts, outputs=outputs, vocab_size=vocab_size)).tolist() \
        == got.argmax(1).tolist()


def test_greedy_with_repetition_penalty_equals_transformers_generate():
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(2)
    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = MistralForCausalLM(config).eval()
    prompt = [1, 17, 33, 17, 90, 5]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                  repetition_penalty=1.8, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        output: list[int] = []
        for _ in range(16):
            logits = model(torch.tensor([prompt + output])).logits[:, -1]
            row = SamplingRow(SamplingParams(16, repetition_penalty=1.8), array("q", prompt), array("q", output))
            output.append(int(tokens_of(logits, SamplingBatch.build([row], 128, EOS, CPU))[0]))
    assert output == expected.tolist()
    assert len(set(output)) > 1


def test_presence_and_frequency_penalties_subtract_from_the_output_tokens():
    torch.manual_seed(3)
    vocab_size = 200
    logits = torch.randn(2, vocab_size)
    outputs = [[5, 5, 5, 9, 12, 9], [7]]
    params = [SamplingParams(5, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(5, presence_penalty=-1.0, frequency_penalty=1.5)]
    got = processed(logits, batch(params, prompts=[[5, 6, 7]] * 2, outputs=outputs, vocab_size=vocab_size))
    for row, p in enumerate(params):
        counts = torch.bincount(torch.tensor(outputs[row]), minlength=vocab_size).float()
        expected = logits[row] - (p.presence_penalty * (counts > 0) + p.frequency_penalty * counts)
        assert torch.allclose(got[row], expected, atol=1e-6)
    assert got[0, 6] == logits[0, 6]   # prompt tokens are not penalized


def test_logit_bias_is_added_and_can_make_a_token_the_greedy_choice():
    logits = torch.zeros(2, 64)
    logits[:, 10] = 5.0
    params = [SamplingParams(5, logit_bias=((3, 8.0), (10, -1.5))), SamplingParams(5)]
    sampling_batch = batch(params, vocab_size=64)
    got = processed(logits, sampling_batch)
    expected = logits.clone()
    expected[0, 3] += 8.0
    expected[0, 10] -= 1.5
    assert torch.equal(got, expected)
    assert tokens_of(logits, sampling_batch).tolist() == [3, 10]


def test_min_tokens_masks_the_end_of_sequence_and_stop_tokens_until_reached():
    logits = torch.zeros(1, 32)
    logits[0, EOS], logits[0, 20], logits[0, 7] = 9.0, 8.0, 1.0
    p = SamplingParams(10, min_tokens=3, stop_token_ids=(20,))
    assert tokens_of(logits, batch([p], [2], vocab_size=32)).tolist() == [7]     # 2 outputs: eos and 20 masked
    assert tokens_of(logits, batch([p], [3], vocab_size=32)).tolist() == [EOS]   # 3 outputs: nothing masked
    ignoring = SamplingParams(10, min_tokens=3, stop_token_ids=(20,), ignore_eos=True)
    assert tokens_of(logits, batch([ignoring], [0], vocab_size=32)).tolist() == [EOS]   # eos ends nothing here
    sampled = [SamplingParams(10, temperature=1.0, min_tokens=5, seed=s) for s in range(300)]
    assert EOS not in tokens_of(logits.expand(300, 32), batch(sampled, vocab_size=32)).tolist()


def test_min_p_drops_tokens_below_its_share_of_the_best():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.03, 0.02])
    logits = probs.log()[None, :]
    temperature, min_p = 0.8, 0.2
    params = [SamplingParams(5, temperature=temperature, min_p=min_p, seed=s) for s in range(4000)]
    tokens = tokens_of(logits.expand(4000, 6), batch(params, vocab_size=6))
    scaled = torch.softmax(logits[0] / temperature, 0)
    kept = scaled >= min_p * scaled.max()
    assert set(tokens.tolist()) == set(kept.nonzero()[:, 0].tolist())
    expected = torch.where(kept, scaled, 0.0) / torch.where(kept, scaled, 0.0).sum()
    assert torch.allclose(torch.bincount(tokens, minlength=6).float() / 4000, expected, atol=0.03)


def test_temperature_scales_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    params = [SamplingParams(5, temperature=0.5, seed=s) for s in range(4000)]
    tokens = tokens_of(logits.expand(4000, 3), batch(params, vocab_size=3))
    assert torch.allclose(torch.bincount(tokens, minlength=3).float() / 4000, torch.softmax(logits[0] / 0.5, 0),
                          atol=0.03)


def test_top_k_top_p_sample_their_renormalized_distribution():
    probs = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.08, 0.07])
    logits = probs.log()[None, :]
    params = [SamplingParams(5, temperature=1.0, top_k=4, top_p=0.8, seed=s) for s in range(6000)]
    tokens = tokens_of(logits.expand(6000, 6), batch(params, vocab_size=6))
    # top-4 renormalized: 0.3/0.85, 0.25/0.85, 0.2/0.85, 0.1/0.85; mass before the 4th is 0.88 >= 0.8: 3 kept
    expected = torch.tensor([0.3, 0.25, 0.2, 0.0, 0.0, 0.0]) / 0.75
    assert torch.allclose(torch.bincount(tokens, minlength=6).float() / 6000, expected, atol=0.03)


def test_the_bitmask_allows_only_its_tokens():
    import xgrammar
    vocab_size = 100
    logits = torch.randn(3, vocab_size)
    allowed = xgrammar.allocate_token_bitmask(3, vocab_size)   # all ones
    allowed[0] = 0
    for token in (4, 40, 77):
        allowed[0, token // 32] |= 1 << (token % 32)
    allowed[1] = 0
    allowed[1, 2] = 1 << 1   # token 65 only
    params = [SamplingParams(5), SamplingParams(5, temperature=1.5, seed=1), SamplingParams(5)]
    tokens = tokens_of(logits, batch(params, vocab_size=vocab_size), allowed)
    assert tokens[0] == max((4, 40, 77), key=lambda t: logits[0, t])
    assert tokens[1] == 65
    assert tokens[2] == logits[2].argmax()
    sampled = [SamplingParams(5, temperature=2.0, top_p=0.95, seed=s) for s in range(200)]
    many = tokens_of(logits[:1].expand(200, vocab_size), batch(sampled, vocab_size=vocab_size),
                     allowed[:1].expand(200, -1).contiguous())
    assert set(many.tolist()) <= {4, 40, 77} and len(set(many.tolist())) > 1


# --- logprobs -------------------------------------------------------------------------------------------------

def reference_top(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, ids = logprobs.sort(dim=1, descending=True, stable=True)   # stable: ties keep the smaller id first
    return ids[:, :k], values[:, :k]


def test_logprobs_come_from_the_raw_logits():
    torch.manual_seed(4)
    vocab_size = 500
    logits = torch.randn(3, vocab_size) * 3
    params = [SamplingParams(5, temperature=0.7, top_p=0.9, repetition_penalty=1.5, logit_bias=((11, 4.0),),
                             seed=5, logprobs=True, top_logprobs=5),
              SamplingParams(5, logprobs=True),
              SamplingParams(5, temperature=1.0, seed=6, top_logprobs=3)]
    out = sample(logits, batch(params, prompts=[list(range(50))] * 3, vocab_size=vocab_size))
    raw = torch.log_softmax(logits, 1)
    assert torch.equal(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    ids, values = reference_top(raw, 5)
    assert out.top_token_ids.shape == (3, 5) and torch.equal(out.top_token_ids, ids)
    assert torch.equal(out.top_logprobs, values)


def test_no_logprobs_unless_asked():
    out = sample(torch.randn(2, 40), batch([SamplingParams(5), SamplingParams(5, 1.0)], vocab_size=40))
    assert out.logprobs is None and out.top_token_ids is None and out.top_logprobs is None


@pytest.mark.parametrize("decide_on_host", [True, False])
def test_top_logprobs_order_ties_by_the_smaller_id(decide_on_host):
    torch.manual_seed(5)
    logits = (torch.randn(6, 3000) * 2).round()   # few distinct values: ties everywhere, across the boundary
    logits[5] = 0.0                                # one flat row
    raw = torch.log_softmax(logits, 1)
    for k in (1, 5, 20):
        ids, values = _top_logprobs(raw, k, decide_on_host)
        expected_ids, expected_values = reference_top(raw, k)
        assert torch.equal(ids, expected_ids) and torch.equal(values, expected_values)


# --- top-k / top-p without a sort -----------------------------------------------------------------------------

def reference_kept(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """[R, V] bool: a stable sort's kept prefix (value, then the smaller id), masses as the sampler's fixed point."""
    kept = torch.zeros_like(x, dtype=torch.bool)
    for row in range(x.shape[0]):
        values, ids = x[row].sort(descending=True, stable=True)
        k = top_k[row] or x.shape[1]
        best = values[0]
        if top_k[row]:
            weights = (values[:k] - best).exp()
            probs = weights / weights.sum()
        else:
            probs = ((x[row] - best).exp() / (x[row] - best).exp().sum())[ids]
        masses = (probs[:k] * float(1 << 60)).to(torch.int64)
        before = masses.cumsum(0) - masses
        num_kept = int((before < top_p_mass(top_p[row])).sum())
        kept[row, ids[:num_kept]] = True
    return kept


def random_rows(generator: torch.Generator, num_rows: int, vocab_size: int) -> torch.Tensor:
    """Rows of several shapes: plain, bf16-rounded (ties), peaked, flat, and a flat tail below a few leaders."""
    rows = []
    for i in range(num_rows):
        kind = i % 5
        row = torch.randn(vocab_size, generator=generator) * float(torch.rand(1, generator=generator) * 6 + 0.1)
        if kind == 1:
            row = row.to(torch.bfloat16).float()
        elif kind == 2:
            row[int(torch.randint(0, vocab_size, (1,), generator=generator))] += 25.0
        elif kind == 3:
            row = torch.zeros(vocab_size)
        elif kind == 4:
            row = torch.zeros(vocab_size)
            row[:7] = torch.arange(7, 0, -1).float() * 0.5
        rows.append(row)
    return torch.stack(rows)


def kept(x, top_k, top_p, num_candidates):
    return kept_mask(x, torch.tensor(top_k), torch.tensor([top_p_mass(p) for p in top_p]), num_candidates)


@pytest.mark.parametrize("num_candidates", [16, 256, 2048])
def test_top_k_top_p_keep_exactly_what_a_sort_keeps(num_candidates):
    generator = torch.Generator().manual_seed(6)
    vocab_size, num_rows = 2048, 100
    x = random_rows(generator, num_rows, vocab_size)
    top_p = [[0.3, 0.9, 0.95, 0.5, 1.0, 0.999][i % 6] for i in range(num_rows)]
    top_k = [[0, 0, 5, 0, 12, 0, 1, 0, 16][i % 9] for i in range(num_rows)]
    got = kept(x, top_k, top_p, num_candidates)
    assert torch.equal(got, reference_kept(x, top_k, top_p))


def test_the_candidates_decide_alone_when_the_kept_set_ends_among_them():
    generator = torch.Generator().manual_seed(7)
    vocab_size = 4096
    spread = torch.randn(vocab_size, generator=generator) * 0.3   # 90% of the mass is over thousands of tokens
    peaked = torch.zeros(vocab_size)
    peaked[17] = 30.0
    flat = torch.zeros(vocab_size)
    tied = torch.full((vocab_size,), -20.0)
    tied[1000:1300] = 1.0   # 300 tokens tied at the top: topk's 256 of them are not the smallest ids
    x = torch.stack([spread, peaked, flat, tied])
    top_k, top_p = torch.tensor([0, 0, 0, 5]), torch.tensor([top_p_mass(0.9)] * 3 + [top_p_mass(1.0)])
    candidates = find_candidates(x, top_k, top_p, 256)
    assert candidates.is_exact.tolist() == [False, True, False, False]
    assert candidates.num_kept[1] == 1
    kept_set = kept(x, top_k.tolist(), [0.9, 0.9, 0.9, 1.0], 256)
    assert kept_set[1].nonzero()[:, 0].tolist() == [17]
    assert kept_set[3].nonzero()[:, 0].tolist() == [1000, 1001, 1002, 1003, 1004]
    assert int(kept_set[2].sum()) in (3687, 3688)   # 90% of a flat row, up to the fixed point's rounding


@pytest.mark.parametrize("num_candidates", [16, 512])
def test_the_fast_path_and_the_vocabulary_path_sample_the_same_tokens(num_candidates):
    generator = torch.Generator().manual_seed(8)
    vocab_size, num_rows = 2048, 40
    x = random_rows(generator, num_rows, vocab_size)
    top_k = torch.tensor([[0, 7, 0, 40][i % 4] for i in range(num_rows)])
    top_p = torch.tensor([top_p_mass([0.9, 1.0, 0.6, 0.97][i % 4]) for i in range(num_rows)])
    seed, step = torch.arange(num_rows) * 7919, torch.arange(num_rows)
    on_host = _sample_filtered(x, seed, step, top_k, top_p, num_candidates, True, True, decide_on_host=True)
    on_device = _sample_filtered(x, seed, step, top_k, top_p, num_candidates, True, True, decide_on_host=False)
    widest = _sample_filtered(x, seed, step, top_k, top_p, vocab_size, True, True, decide_on_host=True)
    assert torch.equal(on_host, on_device) and torch.equal(on_host, widest)
    # the Gumbel-max over a sort's kept set, with every token's noise: what both paths choose
    kept = reference_kept(x, top_k.tolist(), [[0.9, 1.0, 0.6, 0.97][i % 4] for i in range(num_rows)])
    expected = (x + gumbel_noise(seed, step, vocab_size)).masked_fill(~kept, -math.inf).argmax(1)
    assert torch.equal(on_host, expected)


def test_rows_without_filters_sample_over_the_whole_vocabulary_as_before():
    torch.manual_seed(9)
    logits = torch.randn(3, 700)
    params = [SamplingParams(5, temperature=t, seed=s) for t, s in ((1.0, 3), (0.6, 4), (1.7, 5))]
    tokens = tokens_of(logits, batch(params, [2, 0, 9], vocab_size=700))
    temperature = torch.tensor([[1.0], [0.6], [1.7]])
    noise = gumbel_noise(torch.tensor([3, 4, 5]), torch.tensor([2, 0, 9]), 700)
    assert tokens.tolist() == (logits / temperature + noise).argmax(1).tolist()


# --- the batch ------------------------------------------------------------------------------------------------

def test_a_row_with_every_control_is_independent_of_its_batch():
    torch.manual_seed(10)
    vocab_size = 4096
    logits = torch.randn(4, vocab_size) * 2
    full = SamplingParams(5, temperature=0.9, top_p=0.8, top_k=30, min_p=0.01, repetition_penalty=1.2,
                          presence_penalty=0.3, frequency_penalty=0.1, logit_bias=((5, 2.0),), min_tokens=4,
                          stop_token_ids=(9,), seed=77, logprobs=True, top_logprobs=4)
    rows = [SamplingRow(SamplingParams(5, temperature=1.1, seed=1), [1, 2], [4]),
            SamplingRow(full, [1, 8, 8, 30], [30, 31, 30]),
            SamplingRow(SamplingParams(5, repetition_penalty=1.5, top_logprobs=2), [1, 3], []),
            SamplingRow(SamplingParams(5, temperature=0.5, top_p=0.5, seed=3), [1], [7, 7])]
    together = sample(logits, SamplingBatch.build(rows, vocab_size, EOS, CPU))
    alone = sample(logits[1:2], SamplingBatch.build(rows[1:2], vocab_size, EOS, CPU))
    assert together.token_ids[1] == alone.token_ids[0]
    assert together.logprobs[1] == alone.logprobs[0]
    assert torch.equal(together.top_token_ids[1], alone.top_token_ids[0])


def test_any_float_dtype_and_the_callers_logits_untouched():
    logits = torch.randn(2, 256)
    before = logits.clone()
    params = [SamplingParams(5, temperature=1.0, top_p=0.9, logit_bias=((3, 1.0),), seed=1),
              SamplingParams(5, repetition_penalty=1.3)]
    out = sample(logits, batch(params, prompts=[[1, 2, 3]] * 2, vocab_size=256))
    assert torch.equal(logits, before) and out.token_ids.dtype == torch.int64
    half = sample(logits.to(torch.bfloat16), batch(params, prompts=[[1, 2, 3]] * 2, vocab_size=256))
    assert half.token_ids.shape == (2,)


def test_token_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="logit_bias"):
        batch([SamplingParams(5, logit_bias=((300, 1.0),))], vocab_size=256)


def test_probabilities_in_fixed_point_reach_one():
    assert top_p_mass(1.0) > 1 << 61 and top_p_mass(0.5) == 1 << 59
    assert math.isclose(top_p_mass(0.9) / (1 << 60), 0.9)


def test_the_noise_is_finite_where_its_hash_is_largest():
    """Seed 4, output token 12, token 93764: the one draw of its row whose 24-bit uniform rounded to 1.0 (noise
    +inf, which on a masked token made NaN, and argmax took it)."""
    noise = gumbel_noise(torch.tensor([4]), torch.tensor([12]), 1 << 17)
    assert torch.isfinite(noise).all()
    mask = torch.full((1, (1 << 17) // 32), -1, dtype=torch.int32)
    mask[0, 93764 // 32] &= ~(1 << (93764 % 32))   # everything allowed but that token
    params = SamplingParams(5, temperature=1.0, seed=4)
    step_12 = SamplingBatch.build([SamplingRow(params, [1], [3] * 12)], 1 << 17, EOS, CPU)
    assert int(sample(torch.zeros(1, 1 << 17), step_12, mask).token_ids[0]) != 93764
