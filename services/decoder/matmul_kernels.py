"""The weight matmuls of steps of at most SKINNY_MAX_ROWS rows (small decode batches), whose time is that of
reading the weights, in bf16 or in e4m3 with per-channel scales. For some of the 12B model's shapes cuBLAS reads
them more slowly (it splits the down projection's reduction into a second kernel); `faster_on_skinny` measures
which at start-up. Capturable in CUDA graphs; run under TRITON_INTERPRET=1 on the CPU by the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from shared.kernels import graph_time

SKINNY_MAX_ROWS = 16
# e4m3 weights: the kernel takes up to this many rows (a decode batch of 64), the weights still read once; where it
# is faster than quantizing the rows for W8A8 is measured at start-up (ops.TritonOps.choose_linear).
SKINNY_FP8_MAX_ROWS = 64
# (output columns a program computes, reduction step of bf16 (halved for float32: the same shared memory), warps,
# pipeline stages): bench/gpu_profile.py's sweep on an H200
SKINNY_LAUNCH = (64, 256, 4, 4)
# The same for e4m3 weights (the reduction step is that of bf16 rows): a first choice, to be swept like the above
SKINNY_FP8_LAUNCH = (64, 256, 4, 4)


@triton.jit(do_not_specialize=["num_rows"])
def _skinny_matmul_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, num_rows, n, k, x_stride, w_stride,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          EVEN_K: tl.constexpr, PRECISION: tl.constexpr, IS_FP8: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    steps = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < num_rows, cols < n
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, k, BLOCK_K):
        inner = start + steps
        x_mask, w_mask = row_ok[:, None], col_ok[:, None]
        if not EVEN_K:
            x_mask, w_mask = x_mask & (inner[None, :] < k), w_mask & (inner[None, :] < k)
        x = tl.load(x_ptr + rows[:, None] * x_stride + inner[None, :], mask=x_mask, other=0.0)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * w_stride + inner[None, :], mask=w_mask, other=0.0)
        if IS_FP8:
            w = w.to(x.dtype)   # e4m3 codes are exact in bf16 and float32
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if IS_FP8:
        acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]   # per output channel
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _skinny(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, launch: tuple) -> torch.Tensor:
    """A program computes BLOCK_N output columns of every row (the rows padded to 16 or more for the tensor cores),
    so each weight element is read once."""
    num_rows, k = x.shape
    n = weight.shape[0]
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = launch
    block_k = block_k * 2 // x.element_size()
    _skinny_matmul_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight if scale is None else scale, out, num_rows, n, k, x.stride(0), weight.stride(0),
        BLOCK_M=max(16, triton.next_power_of_2(num_rows)), BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        IS_FP8=scale is not None, num_warps=warps, num_stages=stages)
    return out


def skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ weight [N, K].T -> [T, N]; this module's kernel for T <= SKINNY_MAX_ROWS, cuBLAS above."""
    if x.shape[0] > SKINNY_MAX_ROWS or x.stride(-1) != 1 or weight.stride(-1) != 1:
        return F.linear(x, weight)
    return _skinny(x, weight, None, SKINNY_LAUNCH)


def skinny_linear_fp8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] (T <= SKINNY_FP8_MAX_ROWS) @ (qweight [N, K] e4m3 * scale [N, 1]).T -> [T, N] in x's dtype: each weight
    element read once, in e4m3, upcast in the kernel, accumulated in float32, the per-channel scale applied to
    the output."""
    if x.shape[0] > SKINNY_FP8_MAX_ROWS:
        raise ValueError(f"skinny_linear_fp8 takes at most {SKINNY_FP8_MAX_ROWS} rows, got {x.shape[0]}")
    return _skinny(x.contiguous(), qweight, scale, SKINNY_FP8_LAUNCH)


def faster_on_skinny(weights: list[torch.Tensor]) -> set[tuple[int, int]]:
    """The shapes of the weights whose matmuls of a few rows run faster on skinny_linear than on cuBLAS, timed on
    this GPU at 1 and SKINNY_MAX_ROWS rows: which one wins differs by shape and chip (bench/gpu_profile.py,
    `linear_*`; figures in docs/benchmarks.md)."""
    faster = set()
    for weight in weights:
        ours = theirs = 0.0
        for rows in (1, SKINNY_MAX_ROWS):
            x = torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
            ours += graph_time(lambda: skinny_linear(x, weight))
            theirs += graph_time(lambda: F.linear(x, weight))
        if ours < theirs:
            faster.add(tuple(weight.shape))
    return faster


def fp8_skinny_rows(weight, dtype: torch.dtype) -> int:
    """The most rows (SKINNY_MAX_ROWS, then doubling up to SKINNY_FP8_MAX_ROWS) for which skinny_linear_fp8 over this
    e4m3 weight (an fp8.Fp8Weight) runs at least as fast as W8A8 on this GPU."""
    from services.decoder.fp8 import w8a8_linear
    rows = SKINNY_MAX_ROWS
    while rows * 2 <= SKINNY_FP8_MAX_ROWS:
        x = torch.zeros(rows * 2, weight.shape[1], dtype=dtype, device=weight.device)
        ours = graph_time(lambda: skinny_linear_fp8(x, weight.qweight, weight.scale))
        if ours > graph_time(lambda: w8a8_linear(x, weight)):
            break
        rows *= 2
    return rows
