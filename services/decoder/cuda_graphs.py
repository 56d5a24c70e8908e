"""CUDA graphs of the decode step, one per batch size, captured once at start-up.

Launching the ~400 kernels of a decode step one by one costs more than the step's own work on hosts with slow
launches; a replayed graph launches them all at once. A step of B sequences replays the graph of the smallest
captured size >= B; the extra rows are padding (slot -1: nothing written; context 0: output 0).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from services.decoder.attention import AttentionMetadata
from services.decoder.kernels import num_decode_splits
from services.decoder.step_inputs import DecodeRows
from shared.cuda_graphs import capture

log = logging.getLogger(__name__)

_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, model, backend, ops, device: torch.device, max_batch: int, max_blocks: int,
                 num_sms: int) -> None:
        """`model`, `backend` and `ops` are the runner's, `max_blocks` the longest block table a sequence has."""
        self.model, self.backend, self.ops = model, backend, ops
        self.sizes = sorted({size for size in _SIZES if size < max_batch} | {max_batch})
        self.rows = torch.zeros(4, self.sizes[-1], dtype=torch.int64, device=device)  # token, position, slot, length
        self.tables = torch.zeros(self.sizes[-1], max_blocks, dtype=torch.int32, device=device)
        self.num_sms = num_sms
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=self.rows[2, :size], num_decode=size,
                                 block_tables=self.tables[:size], context_lens=self.rows[3, :size],
                                 num_splits=num_decode_splits(size, self.model.spec.num_kv_heads, self.num_sms))
        hidden = self.model.embed(self.rows[0, :size], None, None)
        return self.model(hidden, self.rows[1, :size], meta, self.backend, self.ops)

    @torch.inference_mode()
    def capture(self) -> None:
        self.rows.zero_()
        self.rows[2].fill_(-1)
        pool = None
        for size in reversed(self.sizes):   # largest first: the smaller ones reuse its memory pool
            self.graphs[size], self.logits[size] = capture(lambda: self._forward(size), pool)
            pool = self.graphs[size].pool()
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def run(self, decode: DecodeRows, fill=None) -> torch.Tensor:
        """Replays the graph of the smallest captured size that holds the rows -> logits [B, vocab].
        `fill(token_row)` writes input tokens that are on the device already (ModelRunner._pending_inputs)."""
        rows, tables = decode.rows, decode.tables
        batch = rows.shape[1]
        size = next(size for size in self.sizes if size >= batch)
        padded = np.zeros((4, size), dtype=np.int64)
        padded[2] = -1
        padded[:, :batch] = rows
        # Asynchronous copies from pinned memory: the step before this one may still be running.
        self.rows[:, :size].copy_(torch.from_numpy(padded).pin_memory(), non_blocking=True)
        self.tables[:batch, :tables.shape[1]].copy_(torch.from_numpy(tables).pin_memory(), non_blocking=True)
        if fill is not None:
            fill(self.rows[0])
        self.graphs[size].replay()
        return self.logits[size][:batch]
