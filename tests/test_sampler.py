"""Per-row sampling: greedy, temperature, top-k, top-p, seeds that do not depend on the batch."""

from __future__ import annotations

import torch

from services.decoder.sampler import SamplingBatch, gumbel_noise, sample
from services.decoder.sequence import SamplingParams

CPU = torch.device("cpu")


def batch(params, steps=None) -> SamplingBatch:
    return SamplingBatch.build(params, steps or [0] * len(params), CPU)


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(3, 50)
    tokens = sample(logits, batch([SamplingParams(5)] * 3))
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_a_row_samples_the_same_token_whatever_shares_its_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    params = SamplingParams(5, temperature=0.8, top_p=0.9, top_k=50, seed=1234)
    alone = sample(logits[2:3], batch([params], [7]))
    others = [SamplingParams(5), SamplingParams(5, temperature=1.3, seed=9), params, SamplingParams(5, 0.5, seed=2)]
    together = sample(logits, batch(others, [0, 3, 7, 1]))
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
    tokens = sample(logits.expand(4000, 3), batch(params))
    frequencies = torch.bincount(tokens, minlength=3).float() / 4000
    assert torch.allclose(frequencies, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)


def test_top_k_and_top_p_keep_only_the_head():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    top_k = [SamplingParams(5, temperature=1.0, top_k=2, seed=s) for s in range(500)]
    assert set(sample(logits.expand(500, 4), batch(top_k)).tolist()) == {0, 1}
    top_p = [SamplingParams(5, temperature=1.0, top_p=0.7, seed=s) for s in range(500)]
    assert set(sample(logits.expand(500, 4), batch(top_p)).tolist()) == {0, 1}
    tiny_p = [SamplingParams(5, temperature=1.0, top_p=0.01, seed=s) for s in range(50)]
    assert set(sample(logits.expand(50, 4), batch(tiny_p)).tolist()) == {0}
