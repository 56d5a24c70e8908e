"""One batch's sampling parameters as tensors on the logits' device, built on the host from each row's resolved
parameters and tokens (sampler.py reads them)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.decoder.staging import to_device
from shared.sampling import SamplingParams

MIN_CANDIDATES = 256       # tokens taken by topk for top-k/top-p; larger top_k values widen a batch's candidates
MASS_ONE = 1 << 60         # probability 1 in the fixed point top-p compares masses in
_NO_MASS_LIMIT = 1 << 62   # a top-p of 1: more than the fixed-point masses of any row add up to


def top_p_mass(top_p: float) -> int:
    """top_p in the fixed point of the masses (a top_p of 1 or more keeps every token)."""
    return _NO_MASS_LIMIT if top_p >= 1.0 else max(1, int(top_p * MASS_ONE))


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """One row of a batch: it samples its output token number len(output_token_ids)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]   # list or array('q')
    output_token_ids: Sequence[int]


@dataclass(frozen=True, slots=True)
class SampleOutput:
    """A step's choices, on the logits' device; the caller reads them when it needs them."""

    token_ids: torch.Tensor              # [B] int64
    # Where any row asks, every row has them (a row that did not ask ignores its own); a row that asked for fewer
    # than K top logprobs takes the first ones of its row.
    logprobs: torch.Tensor | None        # [B] float32: the chosen tokens' raw logprobs
    top_token_ids: torch.Tensor | None   # [B, K] int64, K the batch's largest top_logprobs; best first
    top_logprobs: torch.Tensor | None    # [B, K] float32


@dataclass(frozen=True, slots=True)
class _TokenEdit:
    """Sparse per-(row, token) edits of the logits: flat index tensors, one entry per edited logit."""

    rows: torch.Tensor     # [N] int64
    tokens: torch.Tensor   # [N] int64
    values: torch.Tensor | None   # [N] float32, or None where the edit carries no value


@dataclass(frozen=True, slots=True)
class SamplingBatch:
    """Per-row parameters of one batch as tensors on the logits' device, and the host's view of which work the
    batch needs (decided from the parameters alone, so sampling never waits for the device)."""

    vocab_size: int
    temperature: torch.Tensor    # [B] float32; 1 for greedy rows
    seed: torch.Tensor           # [B] int64
    step: torch.Tensor           # [B] int64: index of the token being sampled in the row's output
    top_k: torch.Tensor          # [B] int64; 0 for no limit
    top_p_mass: torch.Tensor     # [B] int64, see top_p_mass()
    log_min_p: torch.Tensor      # [B] float32; -inf for no min_p
    banned: _TokenEdit | None    # min_tokens: logits set to -inf
    bias: _TokenEdit | None      # logit_bias: added
    repetition: _TokenEdit | None   # every prompt and output token of a row with a penalty; values: the penalty
    counted: _TokenEdit | None   # output tokens once each; values: what frequency and presence subtract
    num_greedy: int
    plain_rows: torch.Tensor | None      # sampled rows without top-k/top-p, or None if none
    filtered_rows: torch.Tensor | None   # sampled rows with top-k or top-p, or None if none
    num_rows: int
    num_plain: int
    num_filtered: int
    num_candidates: int
    has_min_p: bool
    some_filtered_with_top_k: bool
    some_filtered_without_top_k: bool
    needs_logprobs: bool
    max_top_logprobs: int

    @staticmethod
    def build(rows: list[SamplingRow], vocab_size: int, eos_token_id: int, device) -> SamplingBatch:
        device = torch.device(device)
        params = [row.params for row in rows]
        is_greedy = [p.is_greedy for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
        is_filtered = [not g and (k > 0 or p.top_p < 1.0) for g, k, p in zip(is_greedy, top_k, params)]
        plain = [i for i, (g, f) in enumerate(zip(is_greedy, is_filtered)) if not g and not f]
        filtered = [i for i, f in enumerate(is_filtered) if f]
        max_top_k = max((top_k[i] for i in filtered), default=0)

        def tensor(values, dtype):
            return to_device(torch.tensor(values, dtype=dtype), device)

        def row_indices(indices):
            return tensor(indices, torch.int64) if indices else None

        return SamplingBatch(
            vocab_size=vocab_size,
            temperature=tensor([1.0 if g else p.temperature for g, p in zip(is_greedy, params)], torch.float32),
            seed=tensor([p.seed & 0x7FFFFFFFFFFFFFFF for p in params], torch.int64),
            step=tensor([len(row.output_token_ids) for row in rows], torch.int64),
            top_k=tensor(top_k, torch.int64),
            top_p_mass=tensor([top_p_mass(p.top_p) for p in params], torch.int64),
            log_min_p=tensor([math.log(p.min_p) if p.min_p > 0 and not g else -math.inf
                              for g, p in zip(is_greedy, params)], torch.float32),
            banned=_banned_tokens(rows, vocab_size, eos_token_id, device),
            bias=_biases(params, vocab_size, device),
            repetition=_repetitions(rows, vocab_size, device),
            counted=_output_counts(rows, vocab_size, device),
            num_greedy=sum(is_greedy),
            plain_rows=row_indices(plain),
            filtered_rows=row_indices(filtered),
            num_rows=len(rows),
            num_plain=len(plain),
            num_filtered=len(filtered),
            num_candidates=min(vocab_size, max(MIN_CANDIDATES, max_top_k)),
            has_min_p=any(p.min_p > 0 and not g for g, p in zip(is_greedy, params)),
            some_filtered_with_top_k=any(top_k[i] > 0 for i in filtered),
            some_filtered_without_top_k=any(top_k[i] == 0 for i in filtered),
            needs_logprobs=any(p.logprobs or p.top_logprobs > 0 for p in params),
            max_top_logprobs=max((p.top_logprobs for p in params), default=0),
        )


def _as_ids(token_ids: Sequence[int]) -> np.ndarray:
    return np.asarray(token_ids, dtype=np.int64).reshape(-1)


def _check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{what}: token id outside the vocabulary of {vocab_size}")


def _edit(rows: list[np.ndarray], tokens: list[np.ndarray], values: list[np.ndarray] | None,
          device: torch.device) -> _TokenEdit | None:
    if not rows:
        return None
    values_on_device = None if values is None else \
        to_device(torch.from_numpy(np.concatenate(values).astype(np.float32)), device)
    return _TokenEdit(to_device(torch.from_numpy(np.concatenate(rows)), device),
                      to_device(torch.from_numpy(np.concatenate(tokens)), device), values_on_device)


def _banned_tokens(rows: list[SamplingRow], vocab_size: int, eos_token_id: int, device) -> _TokenEdit | None:
    """Tokens that would end a sequence that has fewer than min_tokens outputs. With ignore_eos the end-of-sequence
    token ends nothing, so it stays (vLLM does the same)."""
    row_ids, token_ids = [], []
    for i, row in enumerate(rows):
        p = row.params
        if len(row.output_token_ids) >= p.min_tokens:
            continue
        stops = np.unique(_as_ids(list(p.stop_token_ids) + ([] if p.ignore_eos else [eos_token_id])))
        _check_ids(stops, vocab_size, "stop_token_ids")
        row_ids.append(np.full(stops.size, i, dtype=np.int64))
        token_ids.append(stops)
    return _edit(row_ids, token_ids, None, device)


def _biases(params: list[SamplingParams], vocab_size: int, device) -> _TokenEdit | None:
    row_ids, token_ids, values = [], [], []
    for i, p in enumerate(params):
        if not p.logit_bias:
            continue
        ids = _as_ids([token for token, _ in p.logit_bias])
        _check_ids(ids, vocab_size, "logit_bias")
        row_ids.append(np.full(ids.size, i, dtype=np.int64))
        token_ids.append(ids)
        values.append(np.asarray([bias for _, bias in p.logit_bias], dtype=np.float64))
    return _edit(row_ids, token_ids, values, device)


def _repetitions(rows: list[SamplingRow], vocab_size: int, device) -> _TokenEdit | None:
    """Every prompt and output token of the rows with a repetition penalty. Repeats stay: each copy of a token
    writes the same penalized value, which spares the host a unique() over a long prompt every step."""
    row_ids, token_ids, values = [], [], []
    for i, row in enumerate(rows):
        penalty = row.params.repetition_penalty
        if penalty == 1.0:
            continue
        ids = np.concatenate([_as_ids(row.prompt_token_ids), _as_ids(row.output_token_ids)])
        _check_ids(ids, vocab_size, "token ids")
        row_ids.append(np.full(ids.size, i, dtype=np.int64))
        token_ids.append(ids)
        values.append(np.full(ids.size, penalty, dtype=np.float64))
    return _edit(row_ids, token_ids, values, device)


def _output_counts(rows: list[SamplingRow], vocab_size: int, device) -> _TokenEdit | None:
    """Each distinct output token once, with frequency * count + presence (what OpenAI's penalties subtract)."""
    row_ids, token_ids, values = [], [], []
    for i, row in enumerate(rows):
        p = row.params
        if (p.frequency_penalty == 0.0 and p.presence_penalty == 0.0) or not len(row.output_token_ids):
            continue
        ids, counts = np.unique(_as_ids(row.output_token_ids), return_counts=True)
        _check_ids(ids, vocab_size, "output token ids")
        row_ids.append(np.full(ids.size, i, dtype=np.int64))
        token_ids.append(ids)
        values.append(p.frequency_penalty * counts + p.presence_penalty)
    return _edit(row_ids, token_ids, values, device)
