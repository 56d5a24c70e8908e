"""Chooses the next token of every sequence in a batch, each with its own parameters.

Sampling uses the Gumbel-max trick with noise that is a pure function of (seed, output index, token id), so a
request's tokens do not depend on which other requests share its batch, nor on preemption and recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.decoder.staging import to_device
from shared.sampling import SamplingParams

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class SamplingBatch:
    """Per-row parameters of one batch, as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float32; 0 for greedy rows
    top_p: torch.Tensor        # [B] float32
    top_k: torch.Tensor        # [B] int64; 0 for no limit
    seed: torch.Tensor         # [B] int64
    step: torch.Tensor         # [B] int64: index of the token being sampled in the sequence's output
    is_greedy: bool            # every row greedy
    needs_filter: bool         # some row uses top_p < 1 or top_k > 0

    @staticmethod
    def build(params: list[SamplingParams], steps: list[int], device: torch.device) -> SamplingBatch:
        def tensor(values, dtype):
            return to_device(torch.tensor(values, dtype=dtype), device)
        return SamplingBatch(
            temperature=tensor([p.temperature for p in params], torch.float32),
            top_p=tensor([p.top_p for p in params], torch.float32),
            top_k=tensor([p.top_k for p in params], torch.int64),
            seed=tensor([p.seed & 0x7FFFFFFFFFFFFFFF for p in params], torch.int64),
            step=tensor(steps, torch.int64),
            is_greedy=all(p.is_greedy for p in params),
            needs_filter=any(p.top_p < 1.0 or p.top_k > 0 for p in params if not p.is_greedy),
        )


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 Gumbel(0, 1) noise, a deterministic function of (seed, step, token id)."""
    row = _mix32(_mix32(seed & _MASK32) ^ ((seed >> 32) & _MASK32))
    row = _mix32(row ^ _mix32(step & _MASK32))
    token = torch.arange(vocab_size, dtype=torch.int64, device=seed.device)
    bits = _mix32(row[:, None] ^ token[None, :])
    # 24 bits fit a float32 mantissa exactly, so u is strictly inside (0, 1).
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(uniform))


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sets to -inf what top-k and then top-p remove; each row keeps at least its best token."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
    sorted_logits = sorted_logits.masked_fill((mass_before >= top_p[:, None]) & (rank > 0), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[B, V] logits (any float dtype) -> [B] int64 token ids."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if batch.is_greedy:
        return greedy
    is_greedy_row = batch.temperature == 0
    scaled = logits / torch.where(is_greedy_row, 1.0, batch.temperature)[:, None]
    if batch.needs_filter:
        scaled = _filter_top_k_top_p(scaled, batch.top_k, batch.top_p)
    sampled = (scaled + gumbel_noise(batch.seed, batch.step, logits.shape[-1])).argmax(dim=-1)
    return torch.where(is_greedy_row, greedy, sampled)
