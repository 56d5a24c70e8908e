"""Triton kernels both towers use (the decoder and the vision tower): residual add + RMSNorm, the SwiGLU activation,
and timing a kernel inside a CUDA graph.

They take their sizes from tensors, never from Python values that change between steps, so they can be captured in
CUDA graphs, and they also run under TRITON_INTERPRET=1 on the CPU, which is how the tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shared.cuda_graphs import capture

# -- RMSNorm ----------------------------------------------------------------------------------------------------

# Launch shapes of the memory-bound kernels, chosen by bench/gpu_vision.py's sweep (`kernel_sweep_*`) on an H200:
# (rows a program normalises, warps) and (columns a program activates, warps).
RMS_NORM_LAUNCH = (2, 4)
SILU_LAUNCH = (2048, 8)


@triton.jit(do_not_specialize=["num_rows"])
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, num_rows, hidden, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < num_rows) & (cols[None, :] < hidden)
    offsets = rows[:, None] * hidden + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32))
        x = x.to(out_ptr.dtype.element_ty)   # the sum in the model dtype, as `residual + out` would be
        tl.store(residual_out_ptr + offsets, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=1) / hidden
    normed = (xf * tl.rsqrt(variance + eps)[:, None]).to(out_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=cols < hidden, other=0.0)
    tl.store(out_ptr + offsets, (normed.to(tl.float32) * weight[None, :].to(tl.float32)).to(
        out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, hidden] -> (RMSNorm(x + residual), x + residual); without a residual, x itself is the new residual."""
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else x
    num_rows, hidden = x.shape
    rows, warps = RMS_NORM_LAUNCH
    _add_rms_norm_kernel[(triton.cdiv(num_rows, rows),)](
        x, residual if residual is not None else x, weight, out, residual_out, num_rows, hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden), ROWS=rows, num_warps=warps)
    return out, residual_out


# -- SwiGLU -----------------------------------------------------------------------------------------------------

@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, size, group, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size
    gate_cols = (cols // group) * 2 * group + cols % group
    gate = tl.load(x_ptr + row * 2 * size + gate_cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * size + gate_cols + group, mask=mask, other=0.0)
    # silu rounded to the model dtype first, then the product: the op order of F.silu(gate) * up
    activated = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * size + cols, (activated.to(tl.float32) * up.to(tl.float32)).to(
        out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """[T, 2 * I] (gate then up) -> silu(gate) * up, [T, I]; with `group`, x's columns alternate `group` gate
    columns and the matching `group` up columns instead."""
    size = x.shape[-1] // 2
    out = torch.empty(x.shape[0], size, dtype=x.dtype, device=x.device)
    block, warps = SILU_LAUNCH
    _silu_and_mul_kernel[(x.shape[0], triton.cdiv(size, block))](x, out, size, group or size, BLOCK=block,
                                                                 num_warps=warps)
    return out


def graph_time(fn, calls: int = 10, replays: int = 3) -> float:
    """GPU milliseconds of one fn() call, timed in a CUDA graph of `calls` calls (no host launch time in it)."""
    graph, _ = capture(lambda: [fn() for _ in range(calls)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (calls * replays)
