"""Bookkeeping of the paged KV cache: which fixed-size blocks each sequence owns. Pure Python, no tensors.

The KV memory itself is allocated once at start-up (model_runner.py); this class only hands out block ids.
A sequence's token at position p lives in block block_table[p // block_size], slot p % block_size.
"""

from __future__ import annotations

from collections import deque

from services.decoder.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` must gain to hold `num_new_tokens` more computed tokens."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        count = self.num_new_blocks(seq, num_new_tokens)
        if count > len(self._free):
            raise RuntimeError("out of KV blocks: call can_allocate first")
        seq.block_table.extend(self._free.popleft() for _ in range(count))

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []
