"""Triton kernels of FP8 (e4m3): rounding to the e4m3 grid, per-row (per-token) quantization of activations, and
the W8A8 matmul of wide steps (e4m3 rows and weights, each with its scales). The e4m3 KV-cache write is in
kernels.py, the skinny matmul over e4m3 weights in matmul_kernels.py.

"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Quantizing kernels (the KV write above, activation rows below) round to the e4m3 grid in float32 arithmetic
# before the cast, so the cast itself is exact. Triton's interpreter loads, upcasts and multiplies e4m3 tensors
# correctly, but its float32 -> e4m3 cast rounds wrongly (a carry out of the mantissa can land in the wrong
# exponent, ties round up, subnormal results are truncated); rounding first gives the GPU's codes on both, in one
# code path that CI tests.

FP8_MAX = tl.constexpr(torch.finfo(torch.float8_e4m3fn).max)   # 448
MIN_AMAX = tl.constexpr(1e-12)   # fp8.MIN_AMAX: all-zero rows get its scale


@triton.jit
def round_to_e4m3(x):
    """float32 -> the nearest e4m3 value (ties to even), still float32, clamped to +-448. Adding and removing
    2^(e + 20), e the exponent of x (at least -6, e4m3's subnormal range), leaves x rounded to e4m3's spacing
    2^(e - 3): the float32 add itself rounds to nearest even there."""
    x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    magic = ((tl.maximum(exponent, -6) + 20 + 127) << 23).to(tl.float32, bitcast=True)
    magnitude = (tl.abs(x) + magic) - magic
    return tl.where(x < 0, -magnitude, magnitude)


# (columns a program reads at a time, warps): one program quantizes one row
QUANTIZE_LAUNCH = (2048, 4)


@triton.jit(do_not_specialize=["num_rows"])
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, num_rows, k, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    peak = tl.zeros([BLOCK], tl.float32)
    for start in range(0, k, BLOCK):
        x = tl.load(x_ptr + row * k + start + cols, mask=start + cols < k, other=0.0).to(tl.float32)
        peak = tl.maximum(peak, tl.abs(x))
    scale = tl.maximum(tl.max(peak, axis=0), MIN_AMAX) / FP8_MAX
    for start in range(0, k, BLOCK):   # the row again: from L2, it was just read
        x = tl.load(x_ptr + row * k + start + cols, mask=start + cols < k, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * k + start + cols, round_to_e4m3(x / scale).to(out_ptr.dtype.element_ty),
                 mask=start + cols < k)
    tl.store(scale_ptr + row, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (e4m3 [T, K], float32 scales [T, 1]): one pass of fp8.quantize_rows (dynamic per token)."""
    x = x.contiguous()
    num_rows, k = x.shape
    codes = torch.empty(num_rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
    block, warps = QUANTIZE_LAUNCH
    _quantize_rows_kernel[(num_rows,)](x, codes, scales, num_rows, k, BLOCK=min(block, triton.next_power_of_2(k)),
                                       num_warps=warps)
    return codes, scales


# (rows, columns and reduction step of a program's tile, tiles of rows grouped for L2 reuse, warps, stages):
# the usual Hopper FP8 tile, to be swept against torch._scaled_mm
FP8_MATMUL_LAUNCH = (128, 128, 128, 8, 8, 4)


@triton.jit(do_not_specialize=["num_rows"])
def _fp8_matmul_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, out_ptr, num_rows, n, k,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       EVEN_K: tl.constexpr):
    program = tl.program_id(0)
    num_row_tiles = tl.cdiv(num_rows, BLOCK_M)
    num_col_tiles = tl.cdiv(n, BLOCK_N)
    # GROUP_M row tiles walk the column tiles together, so each weight tile is read from L2 by GROUP_M programs
    group = program // (GROUP_M * num_col_tiles)
    first_row_tile = group * GROUP_M
    group_size = tl.minimum(num_row_tiles - first_row_tile, GROUP_M)
    row_tile = first_row_tile + (program % (GROUP_M * num_col_tiles)) % group_size
    col_tile = (program % (GROUP_M * num_col_tiles)) // group_size
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    steps = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < num_rows, cols < n
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, k, BLOCK_K):
        inner = start + steps
        a_mask, b_mask = row_ok[:, None], col_ok[:, None]
        if not EVEN_K:
            a_mask, b_mask = a_mask & (inner[None, :] < k), b_mask & (inner[None, :] < k)
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * k + inner[None, :], mask=a_mask, other=0.0)
        b = tl.load(b_ptr + cols[:, None].to(tl.int64) * k + inner[None, :], mask=b_mask, other=0.0)
        # products of one tile are summed in the tensor cores' (narrower) accumulator, tiles in float32
        acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=BLOCK_K)
    a_scale = tl.load(a_scale_ptr + rows, mask=row_ok, other=0.0)
    b_scale = tl.load(b_scale_ptr + cols, mask=col_ok, other=0.0)
    acc = acc * a_scale[:, None] * b_scale[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * n + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def fp8_matmul(codes: torch.Tensor, row_scales: torch.Tensor, qweight: torch.Tensor, col_scales: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """(codes [T, K] e4m3 * row_scales [T, 1]) @ (qweight [N, K] e4m3 * col_scales [N, 1]).T -> [T, N]: e4m3
    tensor-core products accumulated in float32, both scales applied to the output."""
    num_rows, k = codes.shape
    n = qweight.shape[0]
    out = torch.empty(num_rows, n, dtype=out_dtype, device=codes.device)
    block_m, block_n, block_k, group_m, warps, stages = FP8_MATMUL_LAUNCH
    grid = (triton.cdiv(num_rows, block_m) * triton.cdiv(n, block_n),)
    _fp8_matmul_kernel[grid](codes, row_scales, qweight, col_scales, out, num_rows, n, k, BLOCK_M=block_m,
                             BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, EVEN_K=k % block_k == 0,
                             num_warps=warps, num_stages=stages)
    return out
