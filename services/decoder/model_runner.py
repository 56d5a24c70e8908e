"""Turns a scheduled batch into tensors, runs the model over the paged cache, and samples.

The only module of the engine that touches torch devices; the scheduler hands it sequences and gets back one
token per sampling chunk. On CUDA, a step where every sequence decodes one token replays a captured CUDA graph
(cuda_graphs.py); other steps (prompt chunks) run eagerly, decode rows through the paged kernel and prompt chunks
through SDPA.

A step is launched (queued on the device) and collected (its sampled tokens read) separately, so the engine can
queue the next decode step before it reads this one's tokens: the next step's input token of a sequence
continued that way (a PENDING_TOKEN on the host) is taken from this step's output on the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from services.decoder.attention import AttentionBackend, AttentionMetadata, KVCache, PrefillSpan
from services.decoder.model import PixtralDecoder
from services.decoder.ops import TorchOps, TritonOps
from services.decoder.sampler import SamplingBatch, sample, to_device
from services.decoder.scheduler import ScheduledBatch, ScheduledChunk
from services.decoder.sequence import PENDING_TOKEN
from shared.sdpa import warm_up_cudnn

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImageInputs:
    """A sequence's image features, kept until it finishes (a preempted sequence is prefilled again)."""

    features: torch.Tensor   # [N, vision_hidden]: rows in the order of the prompt's [IMG] tokens
    positions: torch.Tensor  # [N] int64 on CPU, ascending: prompt positions of the [IMG] tokens

    def rows_between(self, start: int, end: int) -> tuple[int, int]:
        """Indices [a, b) of the rows whose positions fall in [start, end)."""
        bounds = torch.searchsorted(self.positions, torch.tensor([start, end]))
        return int(bounds[0]), int(bounds[1])


@dataclass(slots=True)
class LaunchedStep:
    """A forward pass queued on the device, with its sampling; collect() reads its tokens."""

    batch: ScheduledBatch
    sampling_chunks: list[ScheduledChunk]   # in the order of `tokens`' rows
    tokens: torch.Tensor | None             # [rows] int64 on the device; None if no chunk samples
    host: torch.Tensor | None = None        # their copy on the host, filled asynchronously on CUDA
    done: torch.cuda.Event | None = None    # recorded after that copy (CUDA)

    def row_of(self) -> dict[int, int]:
        return {id(chunk.seq): row for row, chunk in enumerate(self.sampling_chunks)}


class ImageRowStaging:
    """Page-locked buffers, allocated once, that a step's image rows pass through on their way to the GPU.

    The rows live in ordinary memory (features.py says why); a copy from there would wait for the step in flight.
    Two buffers take turns, so filling one never waits: the copy out of the other was queued two steps ago, and
    the engine has read the step before the one in flight by the time it launches the next."""

    def __init__(self, max_rows: int, columns: int, dtype: torch.dtype) -> None:
        self.buffers = [torch.empty(max_rows, columns, dtype=dtype, pin_memory=True) for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]   # recorded after each buffer's last copy
        self.turn = 0

    def to_device(self, parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """[rows_i, columns] host tensors -> one [sum rows_i, columns] tensor on the device, in the buffers'
        dtype (the model's: embed() converts to it anyway)."""
        if parts[0].device.type != "cpu":   # on the device already: the service's rows never are, benchmarks' may be
            return torch.cat([part.to(device) for part in parts])
        num_rows = sum(part.shape[0] for part in parts)
        buffer = self.buffers[self.turn]
        if num_rows > buffer.shape[0]:   # more rows than a step holds: not expected; correct, only slower
            return to_device(torch.cat(parts), device)
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()
        start = 0
        for part in parts:
            buffer[start:start + part.shape[0]].copy_(part)
            start += part.shape[0]
        on_device = buffer[:num_rows].to(device, non_blocking=True)
        self.copied[self.turn] = torch.cuda.Event()
        self.copied[self.turn].record()
        self.turn ^= 1
        return on_device


class ModelRunner:
    def __init__(self, model: PixtralDecoder, cache: KVCache, device: torch.device, max_num_seqs: int,
                 max_model_len: int, use_fused_kernels: bool = False, use_cuda_graphs: bool = False,
                 max_step_tokens: int = 0) -> None:
        """`use_fused_kernels`: Triton ops and the paged decode kernel (CUDA; tests run them interpreted).
        `max_step_tokens`: the most tokens a step holds, which sizes the staging buffers of image rows (CUDA)."""
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.block_size
        self.is_fused = use_fused_kernels
        self.ops = TritonOps() if use_fused_kernels else TorchOps()
        self.backend = AttentionBackend(cache, model.spec.head_dim ** -0.5)
        self.max_blocks = -(-max_model_len // self.block_size)
        self.staging = ImageRowStaging(max_step_tokens, model.spec.vision_hidden_size,
                                       model.embed_tokens.weight.dtype) if device.type == "cuda" else None
        self.graphs = None
        if use_fused_kernels and use_cuda_graphs:
            from services.decoder.cuda_graphs import DecodeGraphs
            self.graphs = DecodeGraphs(self, max_num_seqs)

    @torch.inference_mode()
    def warm_up(self, num_tokens: int) -> None:
        """One full-budget prefill pass (writing nothing to the cache: slot -1, fused kernels only) and every kernel
        variant, at start-up: the first request must not pay for library initialisation, kernel compilation or
        the allocator's growth."""
        if self.is_fused:
            from services.decoder import kernels
            spec = self.model.spec
            dtype = self.model.embed_tokens.weight.dtype
            kernels.warm_up(dtype, self.device, spec.num_heads, spec.num_kv_heads, spec.head_dim, self.block_size,
                            self.cache.is_fp8)
            warm_up_cudnn(spec.num_heads, spec.num_kv_heads, spec.head_dim, True, dtype, self.device)
            layer = self.model.layers[0]
            self.ops.choose_linear([layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight,
                                    layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight,
                                    self.model.lm_head.weight])
            log.info("weight matmuls of up to %d rows on the Triton kernel for weights %s, cuBLAS for the others",
                     kernels.SKINNY_MAX_ROWS, sorted(self.ops.skinny_shapes))
        num_tokens = min(num_tokens, self.cache.num_blocks * self.block_size)
        meta = AttentionMetadata(slot_mapping=torch.full((num_tokens,), -1, device=self.device),
                                 prefills=[PrefillSpan(0, num_tokens, num_tokens,
                                                       torch.arange(num_tokens, device=self.device))])
        positions = torch.arange(num_tokens, device=self.device)
        hidden = self.model.embed(torch.zeros(num_tokens, dtype=torch.int64, device=self.device), None, None)
        self.model(hidden, positions, meta, self.backend, self.ops,
                   torch.tensor([num_tokens - 1], device=self.device))

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.int64)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def decode_inputs(self, chunks: list[ScheduledChunk]) -> tuple[np.ndarray, np.ndarray]:
        """Decode rows as host arrays: [4, B] int64 (token, position, slot, context length) and [B, blocks] int32."""
        rows = np.empty((4, len(chunks)), dtype=np.int64)
        # A multiple of 16 columns: the kernel is specialised on its row stride's divisibility; keep it one variant.
        width = -(-max(len(chunk.seq.block_table) for chunk in chunks) // 16) * 16
        tables = np.zeros((len(chunks), width), dtype=np.int32)
        for i, chunk in enumerate(chunks):
            seq, position = chunk.seq, chunk.start
            table = seq.block_table
            rows[:, i] = (seq.token_ids[position], position,
                          table[position // self.block_size] * self.block_size + position % self.block_size,
                          position + 1)
            tables[i, :len(table)] = table
        return rows, tables

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Queues the batch's forward pass and sampling. `previous`: the step in flight whose tokens the
        PENDING_TOKEN inputs of this batch are."""
        if self.graphs is not None and batch.is_decode_only and self.graphs.fits(len(batch.chunks)):
            fill = self._pending_inputs(batch.chunks, previous)
            logits = self.graphs.run(*self.decode_inputs(batch.chunks), fill)
            return self._sample(logits, batch, batch.chunks)
        # Fused: decode rows first (one paged-kernel call), then prompt chunks.
        order = sorted(batch.chunks, key=lambda c: not (c.num_tokens == 1 and c.is_sampling)) \
            if self.is_fused else list(batch.chunks)
        fill = self._pending_inputs(order, previous)
        num_decode = sum(1 for c in order if c.num_tokens == 1 and c.is_sampling) if self.is_fused else 0
        token_ids, positions, slot_mapping, prefills = [], [], [], []
        image_features, image_rows, logits_rows = [], [], []
        row = 0
        for index, chunk in enumerate(order):
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            token_ids.extend(seq.token_ids[start:end])
            positions.append(torch.arange(start, end))
            if index < num_decode:
                slot_mapping.append(self._slots(seq.block_table, start, end))
            else:
                context_slots = self._slots(seq.block_table, 0, end)
                slot_mapping.append(context_slots[start:end])
                prefills.append(PrefillSpan(row, chunk.num_tokens, end, to_device(context_slots, self.device)))
            if seq.images is not None and start < seq.num_prompt_tokens:
                first, last = seq.images.rows_between(start, end)
                if last > first:
                    image_features.append(seq.images.features[first:last])
                    image_rows.append(seq.images.positions[first:last] - start + row)
            if chunk.is_sampling:
                logits_rows.append(row + chunk.num_tokens - 1)
            row += chunk.num_tokens
        # Every copy to the device goes through page-locked memory: a copy from ordinary memory would wait for the
        # step in flight, and the device would then idle while this step is launched.
        meta = AttentionMetadata(slot_mapping=to_device(torch.cat(slot_mapping), self.device),
                                 num_decode=num_decode, prefills=prefills)
        if num_decode:
            _, tables = self.decode_inputs(order[:num_decode])
            meta.block_tables = to_device(torch.from_numpy(tables), self.device)
            meta.context_lens = to_device(torch.tensor([c.start + 1 for c in order[:num_decode]],
                                                       dtype=torch.int32), self.device)
            from services.decoder.kernels import num_decode_splits
            meta.num_splits = num_decode_splits(num_decode, self.model.spec.num_kv_heads)
        ids = to_device(torch.tensor(token_ids, dtype=torch.int64), self.device)
        if fill is not None:
            fill(ids)
        features, rows = None, None
        if image_features:
            features = self.staging.to_device(image_features, self.device) if self.staging is not None \
                else torch.cat([f.to(self.device) for f in image_features])
            rows = to_device(torch.cat(image_rows), self.device)
        hidden = self.model.embed(ids, features, rows)
        # Prompt chunks that do not reach their end yet sample nothing; the last row is computed anyway.
        logits = self.model(hidden, to_device(torch.cat(positions), self.device), meta, self.backend, self.ops,
                            to_device(torch.tensor(logits_rows or [row - 1]), self.device))
        return self._sample(logits, batch, [c for c in order if c.is_sampling])

    def _pending_inputs(self, chunks: list[ScheduledChunk], previous: LaunchedStep | None):
        """A function that writes the tokens of `previous` into the PENDING_TOKEN input rows of `chunks`
        (one row per chunk before them: continued sequences decode), or None when there are none."""
        if previous is None or previous.tokens is None:
            return None
        source = previous.row_of()
        rows, sources, row = [], [], 0
        for chunk in chunks:
            if chunk.seq.token_ids[chunk.start] == PENDING_TOKEN:
                rows.append(row)
                sources.append(source[id(chunk.seq)])
            row += chunk.num_tokens
        if not rows:
            return None
        rows_on_device = to_device(torch.tensor(rows), self.device)
        taken = previous.tokens.index_select(0, to_device(torch.tensor(sources), self.device))

        def fill(input_ids: torch.Tensor) -> None:
            input_ids.index_copy_(0, rows_on_device, taken)
        return fill

    def _sample(self, logits: torch.Tensor, batch: ScheduledBatch,
                sampling_chunks: list[ScheduledChunk]) -> LaunchedStep:
        """`logits` has one row per chunk of `sampling_chunks`."""
        if not sampling_chunks:
            return LaunchedStep(batch, [], None)
        params = [chunk.seq.sampling for chunk in sampling_chunks]
        if all(p.is_greedy for p in params):
            chosen = logits.argmax(dim=-1)   # no parameter tensors to build and copy
        else:
            steps = [chunk.seq.num_output_tokens for chunk in sampling_chunks]
            chosen = sample(logits, SamplingBatch.build(params, steps, self.device))
        if self.device.type != "cuda":
            return LaunchedStep(batch, sampling_chunks, chosen, chosen)
        host = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True)
        host.copy_(chosen, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return LaunchedStep(batch, sampling_chunks, chosen, host, done)

    def collect(self, step: LaunchedStep) -> list[int | None]:
        """Waits for the step and returns one token per chunk of its batch (None for chunks not sampling)."""
        if step.tokens is None:
            return [None] * len(step.batch.chunks)
        if step.done is not None:
            step.done.synchronize()   # waits without holding the GIL
        # by sequence: a chunk's is_sampling no longer holds once a later step has continued its sequence
        by_seq = dict(zip((id(chunk.seq) for chunk in step.sampling_chunks), step.host.tolist()))
        return [by_seq.get(id(chunk.seq)) for chunk in step.batch.chunks]
