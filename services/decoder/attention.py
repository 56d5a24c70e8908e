"""Attention over the paged KV cache.

The cache of each layer is one tensor per keys and values, [num_blocks * block_size, num_kv_heads, head_dim],
allocated once. A token at position p of a sequence lives in slot block_table[p // block_size] * block_size +
p % block_size. A step's tokens are flattened: sequence i owns rows query_start[i] : query_start[i] + query_len[i]
of q, and attends to its first context_len[i] cached tokens (the step's own tokens included, causally).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor          # [T] int64: cache slot of each new token
    query_start: list[int]              # per sequence: first row in the flattened batch
    query_len: list[int]                # per sequence: rows (tokens computed this step)
    context_len: list[int]              # per sequence: cached tokens after this step
    context_slots: list[torch.Tensor]   # per sequence: [context_len] int64 slots, in position order
    block_tables: torch.Tensor | None = None   # [B, max_blocks] int32, for paged kernels
    context_lens: torch.Tensor | None = None   # [B] int32, for paged kernels


class KVCache:
    """The KV memory of all layers, allocated once."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


class AttentionBackend:
    """Writes the step's keys and values into the cache, then attends. One SDPA call per sequence.

    Works on every device; used on CPU and for prefill on CUDA (decode on CUDA can use a paged kernel).
    """

    def __init__(self, cache: KVCache, scale: float) -> None:
        self.cache = cache
        self.scale = scale

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        self.cache.keys[layer].index_copy_(0, meta.slot_mapping, k)
        self.cache.values[layer].index_copy_(0, meta.slot_mapping, v)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] of the new tokens -> [T, H, D]."""
        self.write(layer, k, v, meta)
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        out = torch.empty_like(q)
        for start, length, context, slots in zip(meta.query_start, meta.query_len, meta.context_len,
                                                 meta.context_slots):
            query = q[start:start + length].transpose(0, 1)[None]     # [1, H, L, D]
            key = keys.index_select(0, slots).transpose(0, 1)[None]  # [1, Hkv, C, D]
            value = values.index_select(0, slots).transpose(0, 1)[None]
            mask, is_causal = None, False
            if length > 1 and length == context:
                is_causal = True  # a whole prompt at once: plain causal attention
            elif length > 1:      # a later prefill chunk: row i sees the cached prefix and rows <= i
                rows = torch.arange(context - length, context, device=q.device)[:, None]
                mask = torch.arange(context, device=q.device)[None, :] <= rows
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal,
                                                      scale=self.scale, enable_gqa=True)
            out[start:start + length] = attended[0].transpose(0, 1)
        return out
