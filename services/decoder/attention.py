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
from services.decoder.staging import to_device
from shared.sdpa import attention, prefill_chunk_attention, varlen_causal_attention


@dataclass(frozen=True, slots=True)
class PrefillSpan:
    query_start: int            # first row of the chunk in the flattened batch
    query_len: int              # rows of the chunk
    context_len: int            # cached tokens of the sequence after this step (the chunk included)
    context_slots: torch.Tensor  # [context_len] int64 cache slots, in position order


# Chunks a step must have for one call to take them all. A call per chunk costs ~0.1 ms of host time a layer, but
# SDPA's calls run on cuDNN for frequent shapes (shared/sdpa.py), ~0.25 ms a layer faster than flash attention on a
# 4k-token image prompt: a step of one or a few prompts keeps them.
MIN_PACKED_SPANS = 4


@dataclass(frozen=True, slots=True)
class PackedPrefills:
    """A step's prompt chunks as one variable-length attention call: their rows follow each other from
    `first_row` on, and their contexts' slots likewise, so all of a step's prompts take one kernel a layer (a
    call per chunk costs ~0.1 ms of host time a layer: a step of hundreds of short prompts spent over a second in
    them)."""

    first_row: int
    num_rows: int
    context_slots: torch.Tensor   # [sum C_i] int64: each chunk's context slots, chunk after chunk
    cu_query: torch.Tensor        # [n + 1] int32: cumulative chunk lengths L_i
    cu_context: torch.Tensor      # [n + 1] int32: cumulative context lengths C_i (C_i >= L_i)
    max_query: int
    max_context: int

    @staticmethod
    def of(spans: list[PrefillSpan], context_slots: torch.Tensor | None = None,
           device: torch.device | None = None) -> PackedPrefills | None:
        """The spans packed (`context_slots`: their slots concatenated, when the caller has them), or None when
        their rows do not follow each other."""
        row = spans[0].query_start
        for span in spans:
            if span.query_start != row:
                return None
            row += span.query_len
        if context_slots is None:
            context_slots = torch.cat([span.context_slots for span in spans])
        lengths = torch.tensor([[0, 0]] + [[span.query_len, span.context_len] for span in spans])
        cu_query, cu_context = to_device(lengths.cumsum(0).to(torch.int32).T.contiguous(),
                                         device or context_slots.device)   # one copy for both
        return PackedPrefills(spans[0].query_start, row - spans[0].query_start, context_slots, cu_query, cu_context,
                              max(span.query_len for span in spans), max(span.context_len for span in spans))


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor                 # [T] int64: cache slot of each row (-1: write nothing)
    num_decode: int = 0                        # rows 0..num_decode-1 decode one token of their sequence
    block_tables: torch.Tensor | None = None   # [num_decode(+padding), max_blocks] int32, decode rows
    context_lens: torch.Tensor | None = None   # [num_decode(+padding)] int32, decode rows (0: padding)
    num_splits: int = 1                        # context splits of the paged decode kernel
    prefills: list[PrefillSpan] = field(default_factory=list)
    packed: PackedPrefills | None = None       # the prefills as one call (StepInputs: CUDA, MIN_PACKED_SPANS or more)


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
    """Prompt chunks packed (metadata.packed, on CUDA): one variable-length flash attention call for all of them
    over their gathered contexts; otherwise (or where flash attention cannot run them) SDPA per chunk. Decode rows
    (metadata.num_decode, set by the runner when it uses the fused kernels): one call of the paged decode kernel
    for all of them."""

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
        if q.is_cuda and self._attend_packed(q, out, keys, values, key_scales, value_scales, meta):
            return out
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

    def _attend_packed(self, q, out, keys, values, key_scales, value_scales, meta: AttentionMetadata) -> bool:
        """The packed prompt rows of `q` attended in one call into `out`; False where there are none or flash
        attention cannot run them (nothing written)."""
        packed = meta.packed
        if packed is None:
            return False
        rows = slice(packed.first_row, packed.first_row + packed.num_rows)
        attended = varlen_causal_attention(
            q[rows], _gather(keys, key_scales, packed.context_slots, q.dtype),
            _gather(values, value_scales, packed.context_slots, q.dtype), packed.cu_query, packed.cu_context,
            packed.max_query, packed.max_context, self.scale)
        if attended is None:
            return False
        out[rows] = attended
        return True

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
