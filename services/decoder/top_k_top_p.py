"""Top-k and top-p without sorting the vocabulary, and the Gumbel noise every sampled row draws with.

The best `num_candidates` tokens come from `topk`, and top-k and top-p are applied there whenever the kept set
provably ends inside them. Where it does not (top-p over a flat distribution, or a tie group that runs past the
candidates), the kept set's boundary is found by a radix select over the whole vocabulary. Ties are ordered by
value, then by the smaller token id, and top-p compares masses in 60-bit fixed point (integer sums, so the same in
any order): the kept set is exactly a stable sort's prefix, whichever path finds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.decoder.sampling_batch import MASS_ONE

_MASK32 = 0xFFFFFFFF


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
    # 23 bits and a half: every u is a float32 strictly inside (0, 1). With 24, the largest rounded to 1.0, whose
    # noise is +inf: on a token a grammar masks (-inf) that made NaN, which argmax takes.
    uniform = ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
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


def sample_filtered(x: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, top_k: torch.Tensor,
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
