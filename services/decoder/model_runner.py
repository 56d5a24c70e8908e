"""Turns a scheduled batch into tensors, runs the model over the paged cache, and samples.

The only module of the engine that touches torch devices; the scheduler hands it sequences and gets back one
token per sampling chunk. On CUDA, a step where every sequence decodes one token replays a captured CUDA graph
(cuda_graphs.py); other steps (prompt chunks) run eagerly, decode rows through the paged kernel and prompt chunks
through SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.decoder.attention import AttentionBackend, AttentionMetadata, KVCache, PrefillSpan
from services.decoder.model import PixtralDecoder
from services.decoder.ops import TorchOps, TritonOps
from services.decoder.sampler import SamplingBatch, sample
from services.decoder.scheduler import ScheduledBatch, ScheduledChunk


@dataclass(frozen=True, slots=True)
class ImageInputs:
    """A sequence's image features, kept until it finishes (a preempted sequence is prefilled again)."""

    features: torch.Tensor   # [N, vision_hidden]: rows in the order of the prompt's [IMG] tokens
    positions: torch.Tensor  # [N] int64 on CPU, ascending: prompt positions of the [IMG] tokens

    def rows_between(self, start: int, end: int) -> tuple[int, int]:
        """Indices [a, b) of the rows whose positions fall in [start, end)."""
        bounds = torch.searchsorted(self.positions, torch.tensor([start, end]))
        return int(bounds[0]), int(bounds[1])


class ModelRunner:
    def __init__(self, model: PixtralDecoder, cache: KVCache, device: torch.device, max_num_seqs: int,
                 max_model_len: int, use_fused_kernels: bool = False, use_cuda_graphs: bool = False) -> None:
        """`use_fused_kernels`: Triton ops and the paged decode kernel (CUDA; tests run them interpreted)."""
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.block_size
        self.is_fused = use_fused_kernels
        self.ops = TritonOps() if use_fused_kernels else TorchOps()
        self.backend = AttentionBackend(cache, model.spec.head_dim ** -0.5)
        self.max_blocks = -(-max_model_len // self.block_size)
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
            from services.decoder.kernels import warm_up
            spec = self.model.spec
            warm_up(self.model.embed_tokens.weight.dtype, self.device, spec.num_heads, spec.num_kv_heads,
                    spec.head_dim, self.block_size)
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
    def run(self, batch: ScheduledBatch) -> list[int | None]:
        if self.graphs is not None and batch.is_decode_only and self.graphs.fits(len(batch.chunks)):
            logits = self.graphs.run(*self.decode_inputs(batch.chunks))
            return self._sample(logits, batch.chunks, batch.chunks)
        # Fused: decode rows first (one paged-kernel call), then prompt chunks.
        order = sorted(batch.chunks, key=lambda c: not (c.num_tokens == 1 and c.is_sampling)) \
            if self.is_fused else list(batch.chunks)
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
                prefills.append(PrefillSpan(row, chunk.num_tokens, end, context_slots.to(self.device)))
            if seq.images is not None and start < seq.num_prompt_tokens:
                first, last = seq.images.rows_between(start, end)
                if last > first:
                    image_features.append(seq.images.features[first:last])
                    image_rows.append(seq.images.positions[first:last] - start + row)
            if chunk.is_sampling:
                logits_rows.append(row + chunk.num_tokens - 1)
            row += chunk.num_tokens
        meta = AttentionMetadata(slot_mapping=torch.cat(slot_mapping).to(self.device), num_decode=num_decode,
                                 prefills=prefills)
        if num_decode:
            _, tables = self.decode_inputs(order[:num_decode])
            meta.block_tables = torch.from_numpy(tables).to(self.device)
            meta.context_lens = torch.tensor([c.start + 1 for c in order[:num_decode]], dtype=torch.int32,
                                             device=self.device)
            from services.decoder.kernels import num_decode_splits
            meta.num_splits = num_decode_splits(num_decode, self.model.spec.num_kv_heads)
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        # pinned host rows: the copies overlap with the work queued before them
        features = torch.cat([f.to(self.device, non_blocking=True) for f in image_features]) \
            if image_features else None
        rows = torch.cat(image_rows).to(self.device) if image_rows else None
        hidden = self.model.embed(ids, features, rows)
        # Prompt chunks that do not reach their end yet sample nothing; the last row is computed anyway.
        logits = self.model(hidden, torch.cat(positions).to(self.device), meta, self.backend, self.ops,
                            torch.tensor(logits_rows or [row - 1], device=self.device))
        return self._sample(logits, [c for c in order if c.is_sampling], batch.chunks)

    def _sample(self, logits: torch.Tensor, sampling_chunks: list[ScheduledChunk],
                chunks: list[ScheduledChunk]) -> list[int | None]:
        """`logits` has one row per chunk of `sampling_chunks`; results come back in the order of `chunks`."""
        if not sampling_chunks:
            return [None] * len(chunks)
        params = [chunk.seq.sampling for chunk in sampling_chunks]
        if all(p.is_greedy for p in params):
            chosen = logits.argmax(dim=-1)   # no parameter tensors to build and copy
        else:
            steps = [chunk.seq.num_output_tokens for chunk in sampling_chunks]
            chosen = sample(logits, SamplingBatch.build(params, steps, self.device))
        tokens = chosen.cpu().tolist()  # .cpu() waits for the GPU without holding the GIL
        by_seq = {id(chunk.seq): token for chunk, token in zip(sampling_chunks, tokens)}
        return [by_seq.get(id(chunk.seq)) if chunk.is_sampling else None for chunk in chunks]
