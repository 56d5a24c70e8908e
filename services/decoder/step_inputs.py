"""A scheduled batch as the model's inputs: token ids, positions, cache slots, attention metadata and image rows.

A step's tokens are flattened into rows: on the fused path first the single-token rows of sequences that decode
(one paged-kernel call for all of them), then the chunks of prompts. Every copy to the device goes through
page-locked memory (staging.py), so preparing a step never waits for the one in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.decoder.attention import MIN_PACKED_SPANS, AttentionMetadata, PackedPrefills, PrefillSpan
from services.decoder.scheduler import ScheduledChunk
from services.decoder.staging import ImageRowStaging, to_device


@dataclass(frozen=True, slots=True)
class ImageInputs:
    """A sequence's image features, kept until it finishes (a preempted sequence is prefilled again)."""

    features: torch.Tensor   # [N, vision_hidden]: rows in the order of the prompt's [IMG] tokens
    positions: torch.Tensor  # [N] int64 on CPU, ascending: prompt positions of the [IMG] tokens

    def rows_between(self, start: int, end: int) -> tuple[int, int]:
        """Indices [a, b) of the rows whose positions fall in [start, end)."""
        bounds = torch.searchsorted(self.positions, torch.tensor([start, end]))
        return int(bounds[0]), int(bounds[1])


@dataclass(frozen=True, slots=True)
class DecodeRows:
    """Decode rows as host arrays, for the paged kernel or a CUDA graph's static inputs."""

    rows: np.ndarray     # [4, B] int64: token, position, cache slot, context length
    tables: np.ndarray   # [B, width] int32 block tables, width a multiple of 16


@dataclass(frozen=True, slots=True)
class EagerInputs:
    """An eager step's inputs on the device."""

    token_ids: torch.Tensor            # [T] int64
    positions: torch.Tensor            # [T] int64
    meta: AttentionMetadata
    logits_rows: torch.Tensor          # rows whose logits are computed
    pending_rows: list[tuple[int, ScheduledChunk]]   # (row, chunk) of inputs the step in flight is sampling


class StepInputs:
    def __init__(self, block_size: int, device: torch.device, staging: ImageRowStaging | None) -> None:
        self.block_size = block_size
        self.device = device
        self.staging = staging   # CUDA: image rows go through its page-locked buffers

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.int64)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def prepare_decode(self, chunks: list[ScheduledChunk]) -> DecodeRows:
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
        return DecodeRows(rows, tables)

    def prepare_prefill(self, order: list[ScheduledChunk], num_decode: int, num_splits: int) -> EagerInputs:
        """The rows of `order`, whose first `num_decode` chunks decode one token each (paged kernel)."""
        token_ids, positions, slot_mapping, spans, logits_rows, pending = [], [], [], [], [], []
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
                spans.append((row, chunk.num_tokens, context_slots))
            if chunk.is_sampling:
                logits_rows.append(row + chunk.num_tokens - 1)
            pending.append((row, chunk))
            row += chunk.num_tokens
        meta = AttentionMetadata(slot_mapping=to_device(torch.cat(slot_mapping), self.device),
                                 num_decode=num_decode)
        if spans:   # every context's slots in one copy, each span's a view of it
            all_slots = to_device(torch.cat([slots for _, _, slots in spans]), self.device)
            offset = 0
            for first, length, slots in spans:
                meta.prefills.append(PrefillSpan(first, length, len(slots), all_slots[offset:offset + len(slots)]))
                offset += len(slots)
            if self.device.type == "cuda" and len(spans) >= MIN_PACKED_SPANS:   # one attention call (attention.py)
                meta.packed = PackedPrefills.of(meta.prefills, all_slots, self.device)
        if num_decode:
            decode = self.prepare_decode(order[:num_decode])
            meta.block_tables = to_device(torch.from_numpy(decode.tables), self.device)
            meta.context_lens = to_device(torch.from_numpy(decode.rows[3].astype(np.int32)), self.device)
            meta.num_splits = num_splits
        # Prompt chunks that do not reach their end yet sample nothing; the last row is computed anyway.
        return EagerInputs(token_ids=to_device(torch.tensor(token_ids, dtype=torch.int64), self.device),
                           positions=to_device(torch.cat(positions), self.device), meta=meta,
                           logits_rows=to_device(torch.tensor(logits_rows or [row - 1]), self.device),
                           pending_rows=pending)

    def prepare_images(self, order: list[ScheduledChunk]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The image features of the prompt rows of `order` and their rows in the step -> (features, rows)."""
        features, rows = [], []
        row = 0
        for chunk in order:
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            if seq.images is not None and start < seq.num_prompt_tokens:
                first, last = seq.images.rows_between(start, end)
                if last > first:
                    features.append(seq.images.features[first:last])
                    rows.append(seq.images.positions[first:last] - start + row)
            row += chunk.num_tokens
        if not features:
            return None, None
        on_device = self.staging.to_device(features, self.device) if self.staging is not None \
            else torch.cat([part.to(self.device) for part in features])
        return on_device, to_device(torch.cat(rows), self.device)
