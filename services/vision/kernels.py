"""Triton kernels of the vision tower (CUDA); the tower also uses the decoder's norm and SwiGLU kernels.

`rotate_heads_`: the 2-D RoPE of the q and k heads of the fused qkv projection, in place. One program rotates all
heads of a few patches: with one program per (patch, head), 64 values each, a 1024x1024 image's 4,096 patches made
131,072 programs of one warp, and the rotation took 84 us per layer on an H200, as long as the attention projections
together (bench/gpu_vision.py, `layer_1024_*`). It runs under TRITON_INTERPRET=1 on the CPU (tests/kernel_checks.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# (rotation pairs a program takes, warps), chosen by bench/gpu_vision.py's sweep (`kernel_sweep_*`) on an H200
ROTATE_LAUNCH = (4096, 8)


@triton.jit(do_not_specialize=["num_tokens"])   # one compiled variant for every batch
def _rotate_heads_kernel(x_ptr, cos_ptr, sin_ptr, num_tokens, row_stride, num_pairs,
                         HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    pairs = tl.arange(0, BLOCK_P)                 # (head, i): dimensions i and i + HALF of a head turn together
    mask = (tokens[:, None] < num_tokens) & (pairs[None, :] < num_pairs)
    i = pairs % HALF
    first = (pairs // HALF) * (2 * HALF) + i
    row = x_ptr + tokens[:, None] * row_stride + first[None, :]
    x1 = tl.load(row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + HALF, mask=mask, other=0.0).to(tl.float32)
    angle = tokens[:, None] * HALF + i[None, :]
    cos = tl.load(cos_ptr + angle, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + angle, mask=mask, other=0.0)
    tl.store(row, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(row + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


def rotate_heads_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, head_dim: int) -> None:
    """Rotate-half RoPE, in place, on the first `num_heads` heads of each row of x [T, >= num_heads * head_dim];
    cos/sin [T, head_dim / 2] float32 (the angle of dimension i and i + head_dim / 2 is the same)."""
    assert x.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    num_pairs = num_heads * head_dim // 2
    block_p = triton.next_power_of_2(num_pairs)
    pairs, warps = ROTATE_LAUNCH
    block_t = max(1, pairs // block_p)            # whole patches: all their heads
    _rotate_heads_kernel[(triton.cdiv(x.shape[0], block_t),)](
        x, cos, sin, x.shape[0], x.stride(0), num_pairs, HALF=head_dim // 2, BLOCK_T=block_t, BLOCK_P=block_p,
        num_warps=warps)
