"""The paged KV cache and attention over it.

The cache of each layer is one tensor for keys and one for values, [num_blocks * block_size, num_kv_heads,
head_dim], allocated once. A token at position p of a sequence lives in slot block_table[p // block_size] *
block_size + p % block_size. A step's tokens are flattened into rows: first the single-token rows of sequences
that are decoding (`num_decode` of them), then the chunks of sequences that are prefilling. Keys and values of
the step are written into the cache before attention (ops.rotary_and_cache), so attention only reads the cache.

With `is_fp8` (--kv-cache-dtype fp8) keys and values are e4m3 codes with a float32 scale per token and KV head
([slots, num_kv_heads] per layer, for keys and for values), computed as the rows are written. Such scales need
no calibration and follow each row's range whatever the activations' scale (heads differ, and an outlier token
coarsens only its own row), for 4 bytes per 128 elements (3%). A static scale per layer would need calibration
data a checkpoint does not carry, and its largest value would set every row's precision. A token's bytes are
(128 + 4) / 256 of bf16's: 1.94x the tokens in the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.decoder.fp8 import FP8_DTYPE, dequantize_rows
from shared.sdpa import attention, prefill_chunk_attention


@dataclass(frozen=True, slots=True)
class PrefillSpan:
    query_start: int            # first row of the chunk in the flattened batch
    query_len: int              # rows of the chunk
    context_len: int            # cached tokens of the sequence after this step (the chunk included)
    context_slots: torch.Tensor  # [context_len] int64 cache slots, in position order


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor                 # [T] int64: cache slot of each row (-1: write nothing)
    num_decode: int = 0                        # rows 0..num_decode-1 decode one token of their sequence
    block_tables: torch.Tensor | None = None   # [num_decode(+padding), max_blocks] int32, decode rows
    context_lens: torch.Tensor | None = None   # [num_decode(+padding)] int32, decode rows (0: padding)
    num_splits: int = 1                        # context splits of the paged decode kernel
    prefills: list[PrefillSpan] = field(default_factory=list)


class KVCache:
    """The KV memory of all layers, allocated once: in the model's dtype, or (`is_fp8`) e4m3 with scales."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, is_fp8: bool = False) -> None:
        num_slots = num_blocks * block_size
        shape = (num_slots, num_kv_heads, head_dim)
        storage = FP8_DTYPE if is_fp8 else dtype
        self.keys = [torch.zeros(shape, dtype=storage, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=storage, device=device) for _ in range(num_layers)]
        self.key_scales: list[torch.Tensor] = []     # [slots, num_kv_heads] float32 per layer (e4m3 only)
        self.value_scales: list[torch.Tensor] = []
        if is_fp8:
            self.key_scales = [torch.zeros(num_slots, num_kv_heads, device=device) for _ in range(num_layers)]
            self.value_scales = [torch.zeros(num_slots, num_kv_heads, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size, self.is_fp8 = num_blocks, block_size, is_fp8

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The layer's key and value scales, (None, None) for a cache in the model's dtype."""
        if not self.is_fp8:
            return None, None
        return self.key_scales[layer], self.value_scales[layer]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (*self.keys, *self.values, *self.key_scales, *self.value_scales))

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype, is_fp8: bool = False) -> int:
        per_row = head_dim + 4 if is_fp8 else head_dim * dtype.itemsize   # a (token, KV head) row of k or v
        return 2 * num_layers * block_size * num_kv_heads * per_row


class AttentionBackend:
    """Prompt chunks: SDPA per sequence over its gathered context. Decode rows (metadata.num_decode, set by the
    runner when it uses the fused kernels): one call of the paged decode kernel for all of them."""

    def __init__(self, cache: KVCache, scale: float) -> None:
        self.cache = cache
        self.scale = scale

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D] -> [T, H, D]."""
        if meta.num_decode and not meta.prefills:
            return self._decode(q, layer, meta)
        out = torch.empty_like(q)
        if meta.num_decode:
            out[:meta.num_decode] = self._decode(q[:meta.num_decode], layer, meta)
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        key_scales, value_scales = self.cache.scales(layer)
        for span in meta.prefills:
            query = q[span.query_start:span.query_start + span.query_len].transpose(0, 1)[None]  # [1, H, L, D]
            key = _gather(keys, key_scales, span.context_slots, q.dtype).transpose(0, 1)[None]  # [1, Hkv, C, D]
            value = _gather(values, value_scales, span.context_slots, q.dtype).transpose(0, 1)[None]
            mask, is_causal, attended = None, False, None
            if span.query_len > 1 and span.query_len == span.context_len:
                is_causal = True  # a whole prompt at once: plain causal attention
            elif span.query_len > 1:  # a later chunk: row i sees the cached prefix and the chunk's rows <= i
                attended = prefill_chunk_attention(query, key, value, self.scale)
                if attended is None:
                    rows = torch.arange(span.context_len - span.query_len, span.context_len, device=q.device)
                    mask = torch.arange(span.context_len, device=q.device)[None, :] <= rows[:, None]
            if attended is None:
                attended = attention(query, key, value, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                                     enable_gqa=True)
            out[span.query_start:span.query_start + span.query_len] = attended[0].transpose(0, 1)
        return out

    def _decode(self, q: torch.Tensor, layer: int, meta: AttentionMetadata) -> torch.Tensor:
        from services.decoder.kernels import paged_decode_attention
        return paged_decode_attention(q, self.cache.keys[layer], self.cache.values[layer], meta.block_tables,
                                      meta.context_lens, self.scale, self.cache.block_size, meta.num_splits,
                                      *self.cache.scales(layer))


def _gather(cache: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """Rows of a layer's keys or values at `slots`, [C, Hkv, D] in `dtype` (dequantized from e4m3)."""
    rows = cache.index_select(0, slots)
    return rows if scales is None else dequantize_rows(rows, scales.index_select(0, slots), dtype)
