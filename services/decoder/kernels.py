"""Triton kernels of the CUDA decode path: fewer, fused launches over the paged KV cache (the residual add + RMSNorm
and SwiGLU kernels, which the vision tower uses too, are in shared/kernels.py).

- `rotary_and_cache`: RoPE on q and k of the fused qkv projection, and the k/v write into the paged cache.
- `paged_decode_attention`: attention of one new token per sequence over its cached context, split along the
  context (flash-decoding) so a single long sequence still fills the GPU; the query heads that share a KV head are
  processed together so each KV entry is read once.

The weight matmuls of small steps are in matmul_kernels.py, the FP8 (e4m3) ones and e4m3 rounding in fp8_kernels.py.

All take their sizes from tensors, never from Python values that change between steps, so they can be captured
in CUDA graphs. They also run under TRITON_INTERPRET=1 on the CPU, which is how the tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.decoder.fp8_kernels import FP8_MAX, MIN_AMAX, round_to_e4m3


# -- RoPE and the KV-cache write --------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["num_tokens"])   # one compiled variant for every batch size
def _rotary_cache_kernel(qkv_ptr, positions_ptr, inv_freq_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                         k_scale_ptr, v_scale_ptr, num_tokens, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, IS_FP8: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)                       # 0..H-1: query heads, H..H+Hkv-1: key heads (with values)
    half: tl.constexpr = HEAD_DIM // 2
    offs = tl.arange(0, half)
    in_batch = tokens < num_tokens
    mask = in_batch[:, None]
    position = tl.load(positions_ptr + tokens, mask=in_batch, other=0).to(tl.float32)
    angle = position[:, None] * tl.load(inv_freq_ptr + offs)[None, :]
    cos, sin = tl.cos(angle), tl.sin(angle)
    row = qkv_ptr + tokens[:, None] * (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM + head * HEAD_DIM + offs[None, :]
    x1 = tl.load(row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + half, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if head < NUM_HEADS:
        out = q_out_ptr + (tokens[:, None] * NUM_HEADS + head) * HEAD_DIM + offs[None, :]
        tl.store(out, y1.to(q_out_ptr.dtype.element_ty), mask=mask)
        tl.store(out + half, y2.to(q_out_ptr.dtype.element_ty), mask=mask)
    else:
        slot = tl.load(slots_ptr + tokens, mask=in_batch, other=-1)
        is_written = in_batch & (slot >= 0)       # padding rows of a CUDA graph have slot -1
        written = is_written[:, None]
        dest = (slot[:, None] * NUM_KV_HEADS + (head - NUM_HEADS)) * HEAD_DIM + offs[None, :]
        value = row + NUM_KV_HEADS * HEAD_DIM
        if IS_FP8:
            # e4m3 with one scale per token and KV head, from the rotated key in float32 (no bf16 rounding first)
            scale_at = slot * NUM_KV_HEADS + (head - NUM_HEADS)
            _store_e4m3_row(k_cache_ptr + dest, k_scale_ptr + scale_at, y1, y2, written, is_written)
            v1 = tl.load(value, mask=mask, other=0.0).to(tl.float32)
            v2 = tl.load(value + half, mask=mask, other=0.0).to(tl.float32)
            _store_e4m3_row(v_cache_ptr + dest, v_scale_ptr + scale_at, v1, v2, written, is_written)
        else:
            tl.store(k_cache_ptr + dest, y1.to(k_cache_ptr.dtype.element_ty), mask=written)
            tl.store(k_cache_ptr + dest + half, y2.to(k_cache_ptr.dtype.element_ty), mask=written)
            tl.store(v_cache_ptr + dest, tl.load(value, mask=mask, other=0.0), mask=written)
            tl.store(v_cache_ptr + dest + half, tl.load(value + half, mask=mask, other=0.0), mask=written)


@triton.jit
def _store_e4m3_row(dest_ptr, scale_ptr, first, second, mask, row_mask):
    """Rows given as two halves [T, D / 2] (float32) -> e4m3 codes at dest_ptr (+ D / 2 for the second half) and
    each row's scale (amax / 448) at scale_ptr [T]."""
    peak = tl.maximum(tl.max(tl.abs(first), axis=1), tl.max(tl.abs(second), axis=1))
    scale = tl.maximum(peak, MIN_AMAX) / FP8_MAX
    half: tl.constexpr = first.shape[1]
    tl.store(dest_ptr, round_to_e4m3(first / scale[:, None]).to(dest_ptr.dtype.element_ty), mask=mask)
    tl.store(dest_ptr + half, round_to_e4m3(second / scale[:, None]).to(dest_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr, scale, mask=row_mask)


def rotary_and_cache(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                     head_dim: int, k_scales: torch.Tensor | None = None,
                     v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [T, (H + 2 Hkv) * D] -> rotated q [T, H, D]; rotated k and v go to their cache slots.
    A program takes one head of up to 16 tokens: one per (token, head) made a 4k-token prefill 170k programs.
    With e4m3 caches, `k_scales` and `v_scales` [slots, Hkv] float32 receive each row's scale."""
    num_tokens = qkv.shape[0]
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    is_fp8 = k_cache.dtype == torch.float8_e4m3fn
    if is_fp8 and (k_scales is None or v_scales is None):
        raise ValueError("an e4m3 KV cache needs its scales")
    block_t = 16
    _rotary_cache_kernel[(triton.cdiv(num_tokens, block_t), num_heads + num_kv_heads)](
        qkv, positions, inv_freq, q, k_cache, v_cache, slot_mapping,
        k_scales if is_fp8 else k_cache, v_scales if is_fp8 else v_cache, num_tokens,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_T=block_t, IS_FP8=is_fp8,
        num_warps=4)
    return q


# -- paged decode attention -------------------------------------------------------------------------------------

@triton.jit
def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr,
                         context_lens_ptr, scale, partial_out_ptr, partial_max_ptr, partial_sum_ptr, max_blocks,
                         NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
                         IS_FP8: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(context_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(context, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, context)

    rows = tl.arange(0, GROUP_PAD)                # the query heads of this KV head (padded for tl.dot)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + (seq * NUM_HEADS + heads)[:, None] * HEAD_DIM + dims[None, :], mask=row_ok[:, None],
                other=0.0)
    running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for tile in range(start, end, BLOCK_N):
        tokens = tile + tl.arange(0, BLOCK_N)
        token_ok = tokens < end
        blocks = tl.load(block_tables_ptr + seq * max_blocks + tokens // BLOCK_SIZE, mask=token_ok, other=0)
        slots = blocks.to(tl.int64) * BLOCK_SIZE + tokens % BLOCK_SIZE
        scale_at = slots * NUM_KV_HEADS + kv_head     # [BLOCK_N]: (slot, KV head) rows
        offsets = scale_at[:, None] * HEAD_DIM + dims[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=token_ok[:, None], other=0.0)
        if IS_FP8:
            # e4m3 codes are exact in q's dtype; each token's scale multiplies its column of scores
            k_scale = tl.load(k_scale_ptr + scale_at, mask=token_ok, other=0.0)
            scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * (k_scale * scale)[None, :]
        else:
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK_N] fp32
        scores = tl.where(token_ok[None, :], scores, float("-inf"))
        tile_max = tl.maximum(running_max, tl.max(scores, axis=1))
        probs = tl.exp(scores - tile_max[:, None])
        correction = tl.exp(running_max - tile_max)
        v = tl.load(v_cache_ptr + offsets, mask=token_ok[:, None], other=0.0)
        if IS_FP8:
            # each token's scale multiplies its row of values: fold it into that token's probabilities
            v_scale = tl.load(v_scale_ptr + scale_at, mask=token_ok, other=0.0)
            acc = acc * correction[:, None] + tl.dot((probs * v_scale[None, :]).to(q.dtype), v.to(q.dtype),
                                                     input_precision=PRECISION)
        else:
            acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        running_max = tile_max
    partial = (seq * NUM_HEADS + heads) * NUM_SPLITS + split
    tl.store(partial_out_ptr + partial[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])
    tl.store(partial_max_ptr + partial, running_max, mask=row_ok)
    tl.store(partial_sum_ptr + partial, running_sum, mask=row_ok)


@triton.jit
def _combine_splits_kernel(partial_out_ptr, partial_max_ptr, partial_sum_ptr, out_ptr,
                           HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    row = tl.program_id(0)                       # seq * NUM_HEADS + head
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    maxes = tl.load(partial_max_ptr + row * NUM_SPLITS + splits, mask=split_ok, other=float("-inf"))
    sums = tl.load(partial_sum_ptr + row * NUM_SPLITS + splits, mask=split_ok, other=0.0)
    best = tl.max(maxes, axis=0)
    weights = tl.where(maxes > float("-inf"), tl.exp(maxes - best), 0.0)
    total = tl.sum(sums * weights, axis=0)
    dims = tl.arange(0, HEAD_DIM)
    parts = tl.load(partial_out_ptr + (row * NUM_SPLITS + splits)[:, None] * HEAD_DIM + dims[None, :],
                    mask=split_ok[:, None], other=0.0)
    out = tl.sum(parts * weights[:, None], axis=0) / tl.maximum(total, 1e-30)
    tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


SPLIT_CHOICES = (1, 2, 4, 8, 16, 32, 64, 128)   # each is a compiled variant of the kernel: warmed up at start-up


def num_decode_splits(batch_size: int, num_kv_heads: int, num_sms: int = 132) -> int:
    """Enough context splits for ~4 programs per multiprocessor, rounded up to a power of two, at most 128."""
    wanted = -(-4 * num_sms // (batch_size * num_kv_heads))
    return next((choice for choice in SPLIT_CHOICES if choice >= wanted), SPLIT_CHOICES[-1])


def decode_launch(num_splits: int) -> dict:
    """Context tokens a program reads at a time and pipeline depth. With 64+ splits (small batches) a program
    reads one or two tiles and nothing is left to prefetch; with fewer, smaller tiles two deep are faster
    (bench/gpu_profile.py, `paged_*`; figures in docs/benchmarks.md)."""
    block_n, stages = (64, 1) if num_splits >= 64 else (32, 2)
    return dict(BLOCK_N=block_n, num_stages=stages, num_warps=4)


def warm_up(dtype: torch.dtype, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int,
            block_size: int, is_fp8: bool = False) -> None:
    """Compiles every variant the eager path may need, so no request waits for Triton's compiler.
    `is_fp8`: the KV cache holds e4m3 codes and scales."""
    q = torch.zeros(1, num_heads, head_dim, dtype=dtype, device=device)
    cache = torch.zeros(block_size, num_kv_heads, head_dim, dtype=torch.float8_e4m3fn if is_fp8 else dtype,
                        device=device)
    scales = torch.zeros(block_size, num_kv_heads, dtype=torch.float32, device=device) if is_fp8 else None
    tables = torch.zeros(1, 16, dtype=torch.int32, device=device)
    lengths = torch.ones(1, dtype=torch.int32, device=device)
    for splits in SPLIT_CHOICES:
        paged_decode_attention(q, cache, cache, tables, lengths, 1.0, block_size, splits, scales, scales)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           block_size: int, num_splits: int, k_scales: torch.Tensor | None = None,
                           v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D] (one new token per sequence) over its cached context -> [B, H, D].

    block_tables [B, max_blocks] int32, context_lens [B] int32 (0 for padding rows, whose output is 0). With e4m3
    caches, `k_scales` and `v_scales` [slots, Hkv] float32 are their rows' scales (dequantized in the kernel).
    """
    is_fp8 = k_cache.dtype == torch.float8_e4m3fn
    if is_fp8 and (k_scales is None or v_scales is None):
        raise ValueError("an e4m3 KV cache needs its scales")
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    partial_out = torch.empty(batch * num_heads * num_splits, head_dim, dtype=torch.float32, device=q.device)
    partial_max = torch.empty(batch * num_heads * num_splits, dtype=torch.float32, device=q.device)
    partial_sum = torch.empty_like(partial_max)
    _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, k_scales if is_fp8 else k_cache, v_scales if is_fp8 else v_cache, block_tables,
        context_lens, scale, partial_out, partial_max, partial_sum,
        block_tables.shape[1], NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32 caches: float32
        IS_FP8=is_fp8, **decode_launch(num_splits))
    out = torch.empty_like(q)
    _combine_splits_kernel[(batch * num_heads,)](partial_out, partial_max, partial_sum, out, HEAD_DIM=head_dim,
                                                 NUM_SPLITS=num_splits,
                                                 SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)))
    return out
