"""The weight matmuls of steps of at most SKINNY_MAX_ROWS rows (small decode batches), whose time is that of
reading the weights, in bf16 or in e4m3 with per-channel scales. For some of the 12B model's shapes cuBLAS reads
them more slowly (it splits the down projection's reduction into a second kernel); `faster_on_skinny` measures
which at start-up. Capturable in CUDA graphs; run under TRITON_INTERPRET=1 on the CPU by the tests.

e4m3 weights have two kernels of few rows (SKINNY_FP8_KINDS), and `fp8_skinny_plan` measures which is faster per
weight and row block:
- "upcast" (skinny_linear_fp8): the weight tile upcast to the activations' dtype in registers, the activations
  as they are; the product is that of the dequantized weight;
- "w8a8" (skinny_linear_w8a8): the rows quantized per token to e4m3 first (fp8_kernels.quantize_rows, as wide
  steps' W8A8 does), then e4m3 x e4m3 on the tensor cores with no conversion of the weight tile. Hopper's e4m3
  tensor-core product takes at least 64 rows on its left, so the kernel computes out.T = W @ codes.T: the
  weight tile is the left operand and the few rows, padded to 16 or more, the right one. Its numerics are W8A8's
  (each row rounded to e4m3 of its own scale: ~2^-4 relative per element), not the upcast kernel's.
"""

from __future__ import annotations

from dataclasses import dataclass

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
# The same for e4m3 weights, where no start-up measurement chose one (fp8_skinny_plan)
SKINNY_FP8_LAUNCH = (64, 256, 4, 4)
# What fp8_skinny_plan tries: an e4m3 tile is half a bf16 one's bytes, so the weights need more programs (narrower
# column blocks) or longer reduction steps than bf16's to keep as many bytes in flight
SKINNY_FP8_LAUNCHES = ((64, 256, 4, 4), (32, 256, 4, 4), (32, 512, 4, 3), (16, 256, 4, 4), (16, 512, 4, 3),
                       (16, 512, 2, 4), (32, 512, 8, 3))
# The W8A8 kernel's (weight rows a program computes: 64 per warp group of the e4m3 tensor-core product, reduction
# step in e4m3 elements, warps, pipeline stages): its default, and what fp8_skinny_plan tries
SKINNY_W8A8_LAUNCH = (64, 256, 4, 3)
SKINNY_W8A8_LAUNCHES = ((64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 4), (128, 256, 8, 3), (64, 512, 4, 3))
SKINNY_FP8_KINDS = ("upcast", "w8a8")


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


@triton.jit(do_not_specialize=["num_rows"])
def _skinny_w8a8_kernel(codes_ptr, row_scale_ptr, w_ptr, col_scale_ptr, out_ptr, num_rows, n, k, w_stride,
                        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_T)
    steps = tl.arange(0, BLOCK_K)
    col_ok, row_ok = cols < n, rows < num_rows
    acc = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)   # out.T: weight rows by activation rows
    for start in range(0, k, BLOCK_K):
        inner = start + steps
        w_mask, x_mask = col_ok[:, None], row_ok[:, None]
        if not EVEN_K:
            w_mask, x_mask = w_mask & (inner[None, :] < k), x_mask & (inner[None, :] < k)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * w_stride + inner[None, :], mask=w_mask, other=0.0)
        x = tl.load(codes_ptr + rows[:, None] * k + inner[None, :], mask=x_mask, other=0.0)
        # both tiles contiguous along K, as the e4m3 tensor-core product reads them; a tile's products summed in
        # its narrower accumulator, tiles in float32
        acc = tl.dot(w, tl.trans(x), acc, max_num_imprecise_acc=BLOCK_K)
    acc = acc * tl.load(col_scale_ptr + cols, mask=col_ok, other=0.0)[:, None]
    acc = acc * tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)[None, :]
    tl.store(out_ptr + rows[None, :] * n + cols[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=col_ok[:, None] & row_ok[None, :])


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


def skinny_linear_fp8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                      launch: tuple | None = None) -> torch.Tensor:
    """x [T, K] (T <= SKINNY_FP8_MAX_ROWS) @ (qweight [N, K] e4m3 * scale [N, 1]).T -> [T, N] in x's dtype: each weight
    element read once, in e4m3, upcast in the kernel, accumulated in float32, the per-channel scale applied to
    the output."""
    if x.shape[0] > SKINNY_FP8_MAX_ROWS:
        raise ValueError(f"skinny_linear_fp8 takes at most {SKINNY_FP8_MAX_ROWS} rows, got {x.shape[0]}")
    return _skinny(x.contiguous(), qweight, scale, launch or SKINNY_FP8_LAUNCH)


def skinny_linear_w8a8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       launch: tuple | None = None) -> torch.Tensor:
    """x [T, K] (T <= SKINNY_FP8_MAX_ROWS) @ (qweight [N, K] e4m3 * scale [N, 1]).T -> [T, N] in x's dtype, W8A8: x
    quantized per token (fp8_kernels.quantize_rows), then e4m3 x e4m3 products accumulated in float32, each
    weight element read once, both scales applied to the output."""
    from services.decoder import fp8_kernels
    num_rows, k = x.shape
    if num_rows > SKINNY_FP8_MAX_ROWS:
        raise ValueError(f"skinny_linear_w8a8 takes at most {SKINNY_FP8_MAX_ROWS} rows, got {num_rows}")
    codes, row_scales = fp8_kernels.quantize_rows(x)   # [T, K] contiguous e4m3, [T, 1] float32
    n = qweight.shape[0]
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = launch or SKINNY_W8A8_LAUNCH
    _skinny_w8a8_kernel[(triton.cdiv(n, block_n),)](
        codes, row_scales, qweight, scale, out, num_rows, n, k, qweight.stride(0),
        BLOCK_T=max(16, triton.next_power_of_2(num_rows)), BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, num_warps=warps, num_stages=stages)
    return out


def skinny_fp8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, kind: str = "upcast",
               launch: tuple | None = None) -> torch.Tensor:
    """The e4m3 matmul of few rows of `kind` (SKINNY_FP8_KINDS) with `launch` (its default where None): what an
    Fp8SkinnyPlan's launch_for gives."""
    if kind == "w8a8":
        return skinny_linear_w8a8(x, qweight, scale, launch)
    if kind != "upcast":
        raise ValueError(f"an e4m3 skinny matmul is one of {SKINNY_FP8_KINDS}, got {kind!r}")
    return skinny_linear_fp8(x, qweight, scale, launch)


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


@dataclass(frozen=True, slots=True)
class Fp8SkinnyPlan:
    """How one e4m3 weight's matmuls of few rows run: on a skinny kernel up to `max_rows` rows (W8A8 of wide
    steps above), with the kind and launch measured fastest for the kernel's row block (16, 32 or 64 rows)."""

    max_rows: int
    launches: dict[int, tuple[str, tuple]]   # the kernel's row block -> (kind of SKINNY_FP8_KINDS, its launch)
    times_ms: dict[int, float]   # rows (1, 16, 32, 64) -> GPU ms of one matmul with the chosen launch

    def launch_for(self, num_rows: int) -> tuple[str, tuple | None]:
        """(kind, launch) of skinny_fp8 for a step of num_rows rows; the upcast kernel's default where the row
        block was not measured."""
        return self.launches.get(max(16, triton.next_power_of_2(num_rows)), ("upcast", None))


def _time_or_none(fn) -> float | None:
    """graph_time of fn, or None where the launch does not fit the GPU (shared memory, registers)."""
    try:
        fn()   # compiles outside the graph: a launch too big for the chip fails here
    except triton.runtime.errors.OutOfResources:
        return None
    return graph_time(fn)


def fp8_skinny_plan(weight, dtype: torch.dtype) -> Fp8SkinnyPlan:
    """The fastest of the upcast kernel's SKINNY_FP8_LAUNCHES and the W8A8 kernel's SKINNY_W8A8_LAUNCHES for each
    row block over this e4m3 weight (an fp8.Fp8Weight; timed at 1 and 16 rows, then 32 and 64), and the most rows
    (SKINNY_MAX_ROWS, then doubling up to SKINNY_FP8_MAX_ROWS) for which it runs at least as fast as the W8A8 of
    wide steps on this GPU."""
    from services.decoder.fp8 import w8a8_linear
    candidates = [("upcast", launch) for launch in SKINNY_FP8_LAUNCHES]
    candidates += [("w8a8", launch) for launch in SKINNY_W8A8_LAUNCHES]
    launches, best_times, times_ms = {}, {}, {}
    for block_rows, timed_rows in ((16, (1, 16)), (32, (32,)), (64, (64,))):
        inputs = [torch.zeros(rows, weight.shape[1], dtype=dtype, device=weight.device) for rows in timed_rows]
        for kind, launch in candidates:
            times = [_time_or_none(lambda: skinny_fp8(x, weight.qweight, weight.scale, kind, launch))
                     for x in inputs]
            if None not in times and sum(times) < best_times.get(block_rows, float("inf")):
                launches[block_rows], best_times[block_rows] = (kind, launch), sum(times)
                times_ms.update(zip(timed_rows, times))
    rows = SKINNY_MAX_ROWS
    while rows * 2 <= SKINNY_FP8_MAX_ROWS and rows * 2 in launches:
        x = torch.zeros(rows * 2, weight.shape[1], dtype=dtype, device=weight.device)
        if best_times[rows * 2] > graph_time(lambda: w8a8_linear(x, weight)):
            break
        rows *= 2
    return Fp8SkinnyPlan(rows, launches, times_ms)
