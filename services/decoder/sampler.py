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

Top-k and top-p need no sort of the vocabulary (top_k_top_p.py). Its fallback over the whole vocabulary runs on the
CPU only for the rows that need it; on an accelerator for every row that may need it, since asking which would
wait for the device.
"""

from __future__ import annotations

import math

import torch

from services.decoder.sampling_batch import SampleOutput, SamplingBatch
from services.decoder.top_k_top_p import gumbel_noise, order_keys, sample_filtered


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
        chosen = sample_filtered(scaled, batch.seed.index_select(0, rows), batch.step.index_select(0, rows),
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
