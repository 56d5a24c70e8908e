"""Runs a scheduled batch through the model over the paged cache, and samples.

The only part of the engine that touches torch devices; the scheduler hands it sequences and gets back one token
per sampling chunk. A step is launched (its forward pass queued on the device), sampled (the sampling queued) and
collected (its tokens read) in three calls, so the engine can queue the next decode step before it reads this
one's tokens, and sample it once they are read: the next step's input token of a sequence continued that way (a
PENDING_TOKEN on the host) is taken from this step's output on the device.

On CUDA, a step where every sequence decodes one token replays a captured CUDA graph (cuda_graphs.py); other steps
run eagerly: decode rows through the paged kernel, prompt chunks through SDPA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from services.decoder.attention import AttentionBackend, AttentionMetadata, KVCache, PrefillSpan
from services.decoder.model import PixtralDecoder
from services.decoder.ops import TorchOps, TritonOps
from services.decoder.sampler import sample
from services.decoder.sampling_batch import SampleOutput, SamplingBatch, SamplingRow
from services.decoder.scheduler import ScheduledBatch, ScheduledChunk
from services.decoder.sequence import PENDING_TOKEN
from services.decoder.staging import ImageRowStaging, to_device
from services.decoder.step_inputs import StepInputs
from shared.generation import Logprobs

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LaunchedStep:
    """A forward pass queued on the device; sample() queues its sampling, collect() reads its tokens."""

    batch: ScheduledBatch
    sampling_chunks: list[ScheduledChunk]   # in the order of the logits' rows
    logits: torch.Tensor | None             # [rows, vocab] float32 on the device; None if no chunk samples
    sampled: SampleOutput | None = None     # once sampled: the tokens (and logprobs) on the device
    host: list[torch.Tensor] | None = None  # their copies on the host, filled asynchronously on CUDA
    done: torch.cuda.Event | None = None    # recorded after those copies (CUDA)

    @property
    def tokens(self) -> torch.Tensor | None:
        """[rows] int64 on the device, once sampled."""
        return None if self.sampled is None else self.sampled.token_ids

    def row_of(self) -> dict[int, int]:
        return {id(chunk.seq): row for row, chunk in enumerate(self.sampling_chunks)}


class ModelRunner:
    def __init__(self, model: PixtralDecoder, cache: KVCache, device: torch.device, max_num_seqs: int,
                 max_model_len: int, use_fused_kernels: bool = False, use_cuda_graphs: bool = False,
                 max_step_tokens: int = 0) -> None:
        """`use_fused_kernels`: Triton ops and the paged decode kernel (CUDA; tests run them interpreted).
        `max_step_tokens`: the most tokens a step holds, which sizes the staging buffers of image rows (CUDA)."""
        self.model = model
        self.cache = cache
        self.device = device
        self.is_fused = use_fused_kernels
        self.ops = TritonOps() if use_fused_kernels else TorchOps()
        self.backend = AttentionBackend(cache, model.spec.head_dim ** -0.5)
        staging = ImageRowStaging(max_step_tokens, model.spec.vision_hidden_size,
                                  model.embed_tokens.weight.dtype) if device.type == "cuda" else None
        self.inputs = StepInputs(cache.block_size, device, staging)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
            else 132
        self.graphs = None
        if use_fused_kernels and use_cuda_graphs:
            from services.decoder.cuda_graphs import DecodeGraphs
            self.graphs = DecodeGraphs(model, self.backend, self.ops, device, max_num_seqs,
                                       max_blocks=-(-max_model_len // cache.block_size), num_sms=self.num_sms)

    @torch.inference_mode()
    def warm_up(self, num_tokens: int) -> None:
        """One full-budget prefill pass (writing nothing to the cache: slot -1, fused kernels only) and every kernel
        variant, at start-up: the first request must not pay for library initialisation, kernel compilation or
        the allocator's growth."""
        if self.is_fused:
            self.ops.warm_up(self.model, self.cache.block_size, self.cache.is_fp8, self.device)
        self.prompt_pass(num_tokens)

    @torch.inference_mode()
    def prompt_pass(self, num_tokens: int) -> None:
        """A prefill pass of `num_tokens` that writes nothing to the cache (slot -1: fused kernels only)."""
        num_tokens = min(num_tokens, self.cache.num_blocks * self.cache.block_size)
        meta = AttentionMetadata(slot_mapping=torch.full((num_tokens,), -1, device=self.device),
                                 prefills=[PrefillSpan(0, num_tokens, num_tokens,
                                                       torch.arange(num_tokens, device=self.device))])
        positions = torch.arange(num_tokens, device=self.device)
        hidden = self.model.embed(torch.zeros(num_tokens, dtype=torch.int64, device=self.device), None, None)
        self.model(hidden, positions, meta, self.backend, self.ops,
                   torch.tensor([num_tokens - 1], device=self.device))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Queues the batch's forward pass. `previous`: the step in flight whose tokens the PENDING_TOKEN inputs
        of this batch are."""
        if self.graphs is not None and batch.is_decode_only and self.graphs.fits(len(batch.chunks)):
            fill = self._pending_inputs(list(enumerate(batch.chunks)), previous)
            logits = self.graphs.run(self.inputs.prepare_decode(batch.chunks), fill)
            return LaunchedStep(batch, list(batch.chunks), logits)
        order = list(batch.chunks)
        num_decode = 0
        if self.is_fused:   # decode rows first: one paged-kernel call for all of them
            order.sort(key=lambda c: not (c.num_tokens == 1 and c.is_sampling))
            num_decode = sum(1 for c in order if c.num_tokens == 1 and c.is_sampling)
        from services.decoder.kernels import num_decode_splits
        step = self.inputs.prepare_prefill(order, num_decode,
                                           num_decode_splits(num_decode, self.model.spec.num_kv_heads, self.num_sms)
                                           if num_decode else 1)
        fill = self._pending_inputs(step.pending_rows, previous)
        if fill is not None:
            fill(step.token_ids)
        hidden = self.model.embed(step.token_ids, *self.inputs.prepare_images(order))
        sampling_chunks = [chunk for chunk in order if chunk.is_sampling]
        logits = self.model(hidden, step.positions, step.meta, self.backend, self.ops, step.logits_rows)
        return LaunchedStep(batch, sampling_chunks, logits if sampling_chunks else None)

    def _pending_inputs(self, rows: list[tuple[int, ScheduledChunk]], previous: LaunchedStep | None):
        """A function that writes the tokens of `previous` into the PENDING_TOKEN input rows among `rows`
        ((row, chunk) of each chunk's first input), or None when there are none."""
        if previous is None or previous.tokens is None:
            return None
        source = previous.row_of()
        pending = [(row, source[id(chunk.seq)]) for row, chunk in rows
                   if chunk.seq.token_ids[chunk.start] == PENDING_TOKEN]
        if not pending:
            return None
        rows_on_device = to_device(torch.tensor([row for row, _ in pending]), self.device)
        taken = previous.tokens.index_select(0, to_device(torch.tensor([src for _, src in pending]), self.device))

        def fill(input_ids: torch.Tensor) -> None:
            input_ids.index_copy_(0, rows_on_device, taken)
        return fill

    @torch.inference_mode()
    def sample(self, step: LaunchedStep) -> None:
        """Queues the sampling of a launched step (its grammars' masks filled from what they accepted so far) and
        the copy of its tokens, and of their logprobs when asked, to the host."""
        if step.logits is None:
            return
        seqs = [chunk.seq for chunk in step.sampling_chunks]
        if all(seq.sampling.is_greedy and seq.constraint is None and not seq.sampling.has_controls
               for seq in seqs):
            step.sampled = SampleOutput(step.logits.argmax(dim=-1), None, None, None)  # no parameters to copy
        else:
            rows = [SamplingRow(seq.sampling, seq.token_ids[:seq.num_prompt_tokens]
                                if seq.sampling.repetition_penalty != 1.0 else (), seq.output_token_ids)
                    for seq in seqs]
            batch = SamplingBatch.build(rows, self.model.spec.vocab_size, self.model.spec.eos_token_id,
                                        self.device)
            step.sampled = sample(step.logits, batch, self._allowed(seqs))
        outputs = [t for t in (step.sampled.token_ids, step.sampled.logprobs, step.sampled.top_token_ids,
                               step.sampled.top_logprobs) if t is not None]
        if self.device.type != "cuda":
            step.host = outputs
            return
        step.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in outputs]
        for host, tensor in zip(step.host, outputs):
            host.copy_(tensor, non_blocking=True)
        step.done = torch.cuda.Event()
        step.done.record()

    def _allowed(self, seqs: list) -> torch.Tensor | None:
        """The token bitmask of the rows with a grammar (rows without one allow every token), on the device."""
        matchers = [seq.constraint for seq in seqs]
        if all(matcher is None for matcher in matchers):
            return None
        from shared.format_bitmasks import allocate_bitmask, fill_bitmasks   # only grammars need xgrammar
        bitmask = allocate_bitmask(len(seqs))
        fill_bitmasks(matchers, bitmask)
        return to_device(bitmask, self.device)

    def collect(self, step: LaunchedStep) -> tuple[list[int | None], list[Logprobs | None]]:
        """Waits for the step -> one token per chunk of its batch (None for chunks not sampling), and the token's
        logprobs where its sequence asked for them."""
        if step.sampled is None:
            return [None] * len(step.batch.chunks), [None] * len(step.batch.chunks)
        if step.done is not None:
            step.done.synchronize()   # waits without holding the GIL
        tokens, *extra = (t.tolist() for t in step.host)
        logprobs = [None] * len(tokens)
        if extra:
            chosen, *top = extra
            top_ids, top_values = top if top else ([[]] * len(tokens), [[]] * len(tokens))
            for row, chunk in enumerate(step.sampling_chunks):
                wanted = chunk.seq.sampling
                if wanted.logprobs or wanted.top_logprobs:
                    count = wanted.top_logprobs
                    logprobs[row] = Logprobs(tokens[row], chosen[row], tuple(top_ids[row][:count]),
                                             tuple(top_values[row][:count]))
        # by sequence: a chunk's is_sampling no longer holds once a later step has continued its sequence
        by_seq = {id(chunk.seq): row for row, chunk in enumerate(step.sampling_chunks)}
        rows = [by_seq.get(id(chunk.seq)) for chunk in step.batch.chunks]
        return ([None if row is None else tokens[row] for row in rows],
                [None if row is None else logprobs[row] for row in rows])
