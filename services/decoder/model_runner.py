"""Turns a scheduled batch into tensors, runs the model over the paged cache, and samples.

The only module of the engine that touches torch devices; the scheduler hands it sequences and gets back one
token per sampling chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.decoder.attention import AttentionBackend, AttentionMetadata, KVCache
from services.decoder.model import PixtralDecoder
from services.decoder.sampler import SamplingBatch, sample
from services.decoder.scheduler import ScheduledBatch


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
    def __init__(self, model: PixtralDecoder, cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.block_size
        self.backend = AttentionBackend(cache, scale=model.spec.head_dim ** -0.5)

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.int64)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int | None]:
        token_ids, positions, slot_mapping = [], [], []
        meta = AttentionMetadata(slot_mapping=torch.empty(0), query_start=[], query_len=[], context_len=[],
                                 context_slots=[])
        image_features, image_rows = [], []
        logits_rows, params, steps = [], [], []
        row = 0
        for chunk in batch.chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            token_ids.extend(seq.token_ids[start:end])
            positions.append(torch.arange(start, end))
            context_slots = self._slots(seq.block_table, 0, end)
            slot_mapping.append(context_slots[start:end])
            meta.query_start.append(row)
            meta.query_len.append(chunk.num_tokens)
            meta.context_len.append(end)
            meta.context_slots.append(context_slots.to(self.device))
            if seq.images is not None and start < seq.num_prompt_tokens:
                first, last = seq.images.rows_between(start, end)
                if last > first:
                    image_features.append(seq.images.features[first:last])
                    image_rows.append(seq.images.positions[first:last] - start + row)
            if chunk.is_sampling:
                logits_rows.append(row + chunk.num_tokens - 1)
                params.append(seq.sampling)
                steps.append(seq.num_output_tokens)
            row += chunk.num_tokens
        meta.slot_mapping = torch.cat(slot_mapping).to(self.device)
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        features = torch.cat(image_features).to(self.device) if image_features else None
        rows = torch.cat(image_rows).to(self.device) if image_rows else None
        hidden = self.model.embed(ids, features, rows)
        if not logits_rows:
            # Only prompt chunks that do not reach the end yet: fill the cache, sample nothing.
            logits_rows = [row - 1]
        logits = self.model(hidden, torch.cat(positions).to(self.device), meta, self.backend,
                            torch.tensor(logits_rows, device=self.device))
        if not params:
            return [None] * len(batch.chunks)
        tokens = sample(logits, SamplingBatch.build(params, steps, self.device)).tolist()
        sampled: list[int | None] = []
        for chunk in batch.chunks:
            sampled.append(tokens.pop(0) if chunk.is_sampling else None)
        return sampled
