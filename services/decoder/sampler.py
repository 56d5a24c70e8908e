"""Chooses the next token of every row of a batch, each row with its own generation controls.

The order follows vLLM's sampler:
  1. logprobs, when asked for, from the model's raw distribution (log-softmax of the logits as they come);
  2. the grammar's allowed-token bitmask, min_tokens (end-of-sequence and stop tokens masked out) and logit bias;
  3. penalties: repetition (transformers' semantics, over prompt and output tokens), then frequency and presence
     (OpenAI's, over output tokens);
  4. greedy rows take the argmax here;
  5. temperature, then min_p, then top-k, then top-p (over the top-k tokens' renormalized distribution);
  6. a Gumbel-max draw whose noise is a pure function of (seed, output index, token id), so a request's tokens do
     not depend on which other requests share its batch, nor on preemption and recomputation.

Top-k and top-p need no sort of the vocabulary: the best `num_candidates` tokens come from `topk`, and top-k and
top-p are applied there whenever the kept set provably ends inside them. Where it does not (top-p over a flat
distribution, or a tie group that runs past the candidates), the kept set's boundary is found by a radix select
over the whole vocabulary. On the CPU that fallback runs only for the rows that need it; on an accelerator it runs
for every row that may need it, since asking which would wait for the device.

Ties are ordered by value, then by the smaller token id, and top-p compares masses in 60-bit fixed point (integer
sums, so the same in any order): the kept set is exactly a stable sort's prefix, whichever path finds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared.sampling import SamplingParams

MIN_CANDIDATES = 256       # tokens taken by topk for top-k/top-p; larger top_k values widen a batch's candidates
MASS_ONE = 1 << 60         # probability 1 in the fixed point top-p compares masses in
_NO_MASS_LIMIT = 1 << 62   # a top-p of 1: more than the fixed-point masses of any row add up to
_MASK32 = 0xFFFFFFFF


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-to-device copy that does not wait for the device's queued work, as a plain copy does: the engine
    prepares a step while the one before it runs."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


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


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def gumbel_at(seed: torch.Tensor, step: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[R, N] float32 Gumbel(0, 1) noise of the [R, N] (or [1, N]) `token_ids`, a deterministic function of
    (seed, step, token id): the same value for a token whichever other tokens it is drawn with."""
    row = _mix32(_mix32(seed & _MASK32) ^ ((seed >> 32) & _MASK32))
    row = _mix32(row ^ _mix32(step & _MASK32))
    bits = _mix32(row[:, None] ^ token_ids)
    # 24 bits fit a float32 mantissa exactly, so u is strictly inside (0, 1).
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(uniform))


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 noise of every token."""
    return gumbel_at(seed, step, torch.arange(vocab_size, dtype=torch.int64, device=seed.device)[None, :])


def _id_bits(vocab_size: int) -> int:
    return max(1, (vocab_size - 1).bit_length())


def order_keys(values: torch.Tensor, token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int64 keys, non-negative and distinct within a row, ordered as (value, then the smaller token id)."""
    bits = (values.float() + 0.0).view(torch.int32).to(torch.int64)   # + 0.0 turns -0.0 into 0.0
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)   # negative floats' bits count down: flipped, the ints order as the floats
    span = 1 << _id_bits(vocab_size)
    return (bits + (1 << 31)) * span + (span - 1 - token_ids)


def _value_order(x: torch.Tensor) -> torch.Tensor:
    """[R, V] int32 that order as the float32 values do."""
    bits = (x + 0.0).view(torch.int32)   # + 0.0 turns -0.0 into 0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _select_digit(histogram: torch.Tensor, above: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest digit where the mass from the top reaches the target, and the mass above that digit."""
    at_or_above = (histogram.sum(1, keepdim=True) + above[:, None]) - histogram.cumsum(1) + histogram
    digit = ((at_or_above >= targets[:, None]).sum(1, keepdim=True) - 1).clamp(min=0)
    return digit, (at_or_above.gather(1, digit) - histogram.gather(1, digit))[:, 0]


def select_prefix(order: torch.Tensor, masses: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    """[R, V] bool: the shortest prefix of each row, in (value, then smaller id) order, whose mass reaches the
    target (`masses` None: each token counts 1), or the whole row where it never does. A radix select: the
    16-bit halves of the values' order narrow down the boundary's value; of the tokens tied at it, the smallest
    ids that the remaining mass needs are kept. Integer masses: exact."""
    num_rows, device = order.shape[0], order.device
    if masses is None:
        masses = torch.ones_like(order, dtype=torch.int64)
    high = (order >> 16) + (1 << 15)
    histogram = torch.zeros(num_rows, 1 << 16, dtype=torch.int64, device=device)
    histogram.scatter_add_(1, high.to(torch.int64), masses)
    total = histogram.sum(1)
    high_digit, above = _select_digit(histogram, torch.zeros_like(total), targets)
    in_bucket = high == high_digit.to(torch.int32)
    histogram = torch.zeros_like(histogram).scatter_add_(1, (order & 0xFFFF).to(torch.int64), masses * in_bucket)
    low_digit, above = _select_digit(histogram, above, targets)
    # [R, 1]: the value order of the last kept token (int32 like `order`: no wider copy for the comparisons)
    boundary = ((high_digit - (1 << 15)) * (1 << 16) + low_digit).to(torch.int32)
    is_tied = order == boundary
    mass_each = torch.where(is_tied, masses, 0).amax(1)   # equal values, equal masses
    num_tied_kept = ((targets - above + mass_each - 1) // mass_each.clamp(min=1)).clamp(max=order.shape[1])
    num_tied_kept = num_tied_kept.to(torch.int32)
    kept = (order > boundary) | (is_tied & (is_tied.cumsum(1, dtype=torch.int32) <= num_tied_kept[:, None]))
    return kept | (total < targets)[:, None]


@dataclass(frozen=True, slots=True)
class Candidates:
    """The best tokens of each filtered row, best first (ties: smaller id first), and what top-k/top-p keep."""

    values: torch.Tensor     # [R, M] float32 logits (after temperature and min_p)
    token_ids: torch.Tensor  # [R, M] int64
    num_kept: torch.Tensor   # [R] int64: top-k/top-p keep the first num_kept candidates...
    is_exact: torch.Tensor   # [R] bool: ...where this holds; elsewhere the whole vocabulary decides


def find_candidates(x: torch.Tensor, top_k: torch.Tensor, top_p_mass: torch.Tensor, num_candidates: int,
                    some_without_top_k: bool = True) -> Candidates:
    """`x` [R, V] float32 logits; top_k [R] (0: none), top_p_mass [R]."""
    vocab_size = x.shape[1]
    values, token_ids = x.topk(num_candidates, dim=1)
    order = order_keys(values, token_ids, vocab_size).argsort(dim=1, descending=True)
    values, token_ids = values.gather(1, order), token_ids.gather(1, order)
    rank = torch.arange(num_candidates, device=x.device)
    limit = torch.where(top_k > 0, top_k, vocab_size)
    in_top_k = rank[None, :] < limit[:, None]
    # Probabilities as a softmax computes them (the best's weight is exactly 1), over the top-k tokens' weights.
    weights = (values - values[:, :1]).exp() * in_top_k
    total = weights.sum(1, keepdim=True)
    if some_without_top_k:   # top-p alone measures mass against the whole distribution
        total = torch.where(top_k[:, None] > 0, total, (x - values[:, :1]).exp().sum(1, keepdim=True))
    masses = (weights / total * float(MASS_ONE)).to(torch.int64)
    mass_before = masses.cumsum(1) - masses
    num_kept = ((mass_before < top_p_mass[:, None]) & in_top_k).sum(1)
    if num_candidates == vocab_size:
        is_exact = torch.ones_like(num_kept, dtype=torch.bool)
    else:
        # Exact where the kept set ends inside the candidates and before the tie group of the last candidate's
        # value (topk took that group's members in no particular order), and where a top-k does not reach past
        # the candidates (its tokens' total mass would be unknown here).
        is_top_k_inside = limit <= num_candidates
        ends_inside = is_top_k_inside | (mass_before[:, -1] + masses[:, -1] >= top_p_mass)
        num_unambiguous = (values > values[:, -1:]).sum(1)
        is_exact = ((top_k == 0) | is_top_k_inside) & ends_inside & (num_kept <= num_unambiguous)
    return Candidates(values, token_ids, num_kept, is_exact)


def vocabulary_kept(x: torch.Tensor, top_k: torch.Tensor, top_p_mass: torch.Tensor, some_with_top_k: bool = True
                    ) -> torch.Tensor:
    """[R, V] bool: what top-k and then top-p keep, from the whole vocabulary."""
    order = _value_order(x)
    kept = None
    if some_with_top_k:
        kept = select_prefix(order, None, torch.where(top_k > 0, top_k, x.shape[1]))
        x = x.masked_fill(~kept, -math.inf)
    weights = (x - x.amax(1, keepdim=True)).exp()
    masses = (weights / weights.sum(1, keepdim=True) * float(MASS_ONE)).to(torch.int64)
    kept_by_top_p = select_prefix(order, masses, top_p_mass)
    return kept_by_top_p if kept is None else kept & kept_by_top_p


def kept_mask(x: torch.Tensor, top_k: torch.Tensor, top_p_mass: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """[R, V] bool: what each row keeps, the candidates deciding where they are exact, else the vocabulary (the
    sampler's two paths, gathered in one mask)."""
    candidates = find_candidates(x, top_k, top_p_mass, num_candidates)
    is_kept = torch.arange(num_candidates, device=x.device)[None, :] < candidates.num_kept[:, None]
    from_candidates = torch.zeros_like(x, dtype=torch.bool).scatter_(1, candidates.token_ids, is_kept)
    return torch.where(candidates.is_exact[:, None], from_candidates, vocabulary_kept(x, top_k, top_p_mass))


def _sample_filtered(x: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, top_k: torch.Tensor,
                     top_p_mass: torch.Tensor, num_candidates: int, some_with_top_k: bool,
                     some_without_top_k: bool, decide_on_host: bool) -> torch.Tensor:
    """[R] tokens of rows with top-k/top-p: among the candidates where the kept set ends there (their noise only),
    else over the vocabulary's kept mask."""
    candidates = find_candidates(x, top_k, top_p_mass, num_candidates, some_without_top_k=some_without_top_k)
    is_kept = torch.arange(num_candidates, device=x.device)[None, :] < candidates.num_kept[:, None]
    scores = (candidates.values + gumbel_at(seed, step, candidates.token_ids)).masked_fill_(~is_kept, -math.inf)
    tokens = candidates.token_ids.gather(1, scores.argmax(1, keepdim=True))[:, 0]
    if decide_on_host:   # the host is the device: reading the flags costs no wait
        rows = (~candidates.is_exact).nonzero()[:, 0]
        if rows.numel() == 0:
            return tokens
        x, seed, step, top_k, top_p_mass = (t.index_select(0, rows) for t in (x, seed, step, top_k, top_p_mass))
    kept = vocabulary_kept(x, top_k, top_p_mass, some_with_top_k=some_with_top_k)
    scores = (x + gumbel_noise(seed, step, x.shape[1])).masked_fill_(~kept, -math.inf)
    from_vocabulary = scores.argmax(1)
    if decide_on_host:
        return tokens.index_copy_(0, rows, from_vocabulary)
    return torch.where(candidates.is_exact, tokens, from_vocabulary)


def _apply_controls(x: torch.Tensor, batch: SamplingBatch, allowed: torch.Tensor | None) -> None:
    """Steps 2 and 3 of the module's order, in place on the [B, V] float32 logits."""
    if allowed is not None:
        import xgrammar   # only grammars need it

        xgrammar.apply_token_bitmask_inplace(x, allowed.to(x.device), vocab_size=batch.vocab_size)
    if batch.banned is not None:
        # a scalar made on the device: torch.tensor(..., device=cuda) would be a blocking copy from the host
        x.index_put_((batch.banned.rows, batch.banned.tokens), x.new_full((), -math.inf))
    if batch.bias is not None:
        x.index_put_((batch.bias.rows, batch.bias.tokens), batch.bias.values, accumulate=True)
    if batch.repetition is not None:
        seen = (batch.repetition.rows, batch.repetition.tokens)
        logits, penalty = x[seen], batch.repetition.values
        x.index_put_(seen, torch.where(logits > 0, logits / penalty, logits * penalty))
    if batch.counted is not None:
        x.index_put_((batch.counted.rows, batch.counted.tokens), -batch.counted.values, accumulate=True)


def _scaled(x: torch.Tensor, rows: torch.Tensor, num_rows: int, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, then min_p, of the sampled `rows` of x (x itself, divided in place, when they are all)."""
    if num_rows == batch.num_rows:
        scaled = x.div_(batch.temperature[:, None])
        log_min_p = batch.log_min_p
    else:
        scaled = x.index_select(0, rows).div_(batch.temperature.index_select(0, rows)[:, None])
        log_min_p = batch.log_min_p.index_select(0, rows)
    if batch.has_min_p:   # p < min_p * p(best) is a logit below the best's by more than -log(min_p)
        scaled.masked_fill_(scaled < scaled.amax(1, keepdim=True) + log_min_p[:, None], -math.inf)
    return scaled


def _top_logprobs(logprobs: torch.Tensor, k: int, decide_on_host: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of the [B, V] logprobs, best first, ties by the smaller token id."""
    vocab_size = logprobs.shape[1]
    values, token_ids = logprobs.topk(k, dim=1)
    # topk's values are right, but of the tokens tied with the k-th it may return any: take the smallest ids.
    last = values[:, -1:]
    is_tied = logprobs == last
    if not decide_on_host or bool((is_tied.sum(1) != (values == last).sum(1)).any()):
        negated_ids = torch.arange(vocab_size, device=logprobs.device, dtype=torch.float32).neg()
        smallest = torch.where(is_tied, negated_ids, -math.inf).topk(k, dim=1).values
        is_above = values > last
        token_ids = torch.cat([torch.where(is_above, token_ids, vocab_size),
                               torch.where(smallest.isfinite(), smallest.neg(), vocab_size).to(torch.int64)], 1)
        values = torch.cat([torch.where(is_above, values, -math.inf),
                            torch.where(smallest.isfinite(), last, -math.inf)], 1)
    order = order_keys(values, token_ids, vocab_size + 1).topk(k, dim=1).indices
    return token_ids.gather(1, order), values.gather(1, order)


def sample(logits: torch.Tensor, batch: SamplingBatch, allowed: torch.Tensor | None = None) -> SampleOutput:
    """[B, V] logits (any float dtype) -> the step's tokens and logprobs. `allowed`: an xgrammar token bitmask
    [B, ceil(V / 32)] int32 (bit set = allowed; rows without a grammar all ones)."""
    decide_on_host = logits.device.type == "cpu"
    raw_logprobs = logits.float().log_softmax(1) if batch.needs_logprobs else None
    x = logits.float()
    edits_logits = (allowed is not None or batch.banned is not None or batch.bias is not None
                    or batch.repetition is not None or batch.counted is not None)
    if x.data_ptr() == logits.data_ptr() and (edits_logits or batch.num_greedy < batch.num_rows):
        x = x.clone()   # the caller's logits stay as they were
    _apply_controls(x, batch, allowed)
    tokens = x.argmax(1) if batch.num_greedy else torch.empty(batch.num_rows, dtype=torch.int64, device=x.device)
    if batch.num_plain:
        scaled = _scaled(x, batch.plain_rows, batch.num_plain, batch)
        seed, step = batch.seed.index_select(0, batch.plain_rows), batch.step.index_select(0, batch.plain_rows)
        tokens.index_copy_(0, batch.plain_rows, (scaled + gumbel_noise(seed, step, batch.vocab_size)).argmax(1))
    if batch.num_filtered:
        rows = batch.filtered_rows
        scaled = _scaled(x, rows, batch.num_filtered, batch)
        chosen = _sample_filtered(scaled, batch.seed.index_select(0, rows), batch.step.index_select(0, rows),
                                  batch.top_k.index_select(0, rows), batch.top_p_mass.index_select(0, rows),
                                  batch.num_candidates, batch.some_filtered_with_top_k,
                                  batch.some_filtered_without_top_k, decide_on_host)
        tokens.index_copy_(0, rows, chosen)
    if raw_logprobs is None:
        return SampleOutput(tokens, None, None, None)
    chosen_logprobs = raw_logprobs.gather(1, tokens[:, None])[:, 0]
    if batch.max_top_logprobs == 0:
        return SampleOutput(tokens, chosen_logprobs, None, None)
    top_ids, top_values = _top_logprobs(raw_logprobs, batch.max_top_logprobs, decide_on_host)
    return SampleOutput(tokens, chosen_logprobs, top_ids, top_values)
