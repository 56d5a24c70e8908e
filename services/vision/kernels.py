"""Triton kernels of the vision tower (CUDA); the tower also uses the shared norm and SwiGLU kernels
(shared/kernels.py). They run under TRITON_INTERPRET=1 on the CPU (tests/kernel_checks.py).

`qkv_rotated` and `gate_up_swiglu`: the qkv projection with the 2-D RoPE of its q and k heads, and the gate/up
projection with its SwiGLU, each one matmul whose epilogue combines the two halves of each block of output columns
before they are stored, so the [T, 2I] product is never written. They load through TMA descriptors, which Hopper
and later GPUs have (the same matmul with pointer loads was slower than cuBLAS). Elsewhere the tower runs cuBLAS,
then:

`rotate_heads_`: the 2-D RoPE of the q and k heads of the fused qkv projection, in place. One program rotates all
heads of a few patches: one program per (patch, head), 64 values each, made a 1024x1024 image 131,072 programs of
one warp, as slow as the attention projections together. Figures of both: docs/benchmarks.md (vision).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


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


# -- the qkv and gate/up projections with RoPE and SwiGLU in their epilogues ----------------------------------------

# (rows, columns, reduction step, warps, pipeline stages, warp specialization) of a program: bench/gpu_profile.py's
# sweep (`paired_*`) on an H200
ROPE_LAUNCH = (128, 256, 64, 8, 3, True)
SWIGLU_LAUNCH = (128, 128, 64, 8, 3, False)
_GROUP_ROWS = 8   # row blocks that take the same columns one after another, so the weights they read stay in L2


@triton.jit(do_not_specialize=["num_rows"])
def _paired_matmul_kernel(x_desc, w_desc, out_desc, cos_ptr, sin_ptr, num_rows, k, num_cols, rotated_cols,
                          SWIGLU: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr, WS: tl.constexpr):
    """x @ w.T, whose output columns come in blocks of 2 * HALF: a first and a second half, combined column by
    column before they are stored. RoPE: a block is a head; the blocks before column `rotated_cols` (q and k) are
    turned by the angles of (row, column in the half), the rest (v) stored as they are. SWIGLU: a block is HALF
    gate columns then the matching up columns; HALF columns of silu(gate) * up are stored."""
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(num_rows, BLOCK_M)
    per_group = GROUP * (num_cols // BLOCK_N)
    first_block = (pid // per_group) * GROUP
    group_size = tl.minimum(row_blocks - first_block, GROUP)
    m0 = (first_block + (pid % per_group) % group_size) * BLOCK_M
    n0 = ((pid % per_group) // group_size) * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(0, k, BLOCK_K, warp_specialize=WS):   # TMA zero-fills rows and steps past the ends
        acc = tl.dot(x_desc.load([m0, k0]), w_desc.load([n0, k0]).T, acc, input_precision=PRECISION)
    blocks: tl.constexpr = BLOCK_N // (2 * HALF)
    first, second = tl.split(acc.reshape(BLOCK_M, blocks, 2, HALF).permute(0, 1, 3, 2))   # [BLOCK_M, blocks, HALF]
    if SWIGLU:
        out = (first / (1.0 + tl.exp(-first)) * second).reshape(BLOCK_M, BLOCK_N // 2)
        out_desc.store([m0, n0 // 2], out.to(out_desc.dtype))
    else:
        if n0 < rotated_cols:
            rows = m0 + tl.arange(0, BLOCK_M)
            angle = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
            ok = (rows < num_rows)[:, None]
            cos = tl.load(cos_ptr + angle, mask=ok, other=0.0)[:, None, :]
            sin = tl.load(sin_ptr + angle, mask=ok, other=0.0)[:, None, :]
            first, second = first * cos - second * sin, second * cos + first * sin
        out = tl.join(first, second).permute(0, 1, 3, 2).reshape(BLOCK_M, BLOCK_N)
        out_desc.store([m0, n0], out.to(out_desc.dtype))


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """TMA (tensor memory access) is Hopper's and later; Triton's interpreter runs it on the CPU."""
    return device.type == "cpu" or torch.cuda.get_device_capability(device) >= (9, 0)


def _paired_matmul(x, weight, cos, sin, rotated_cols, swiglu, half, launch) -> torch.Tensor | None:
    """The output, or None (nothing allocated) where the kernel does not apply."""
    block_m, block_n, block_k, warps, stages, specialize = launch
    cols = weight.shape[0]
    out_cols = cols // 2 if swiglu else cols
    while block_n > 2 * half and (cols % block_n or rotated_cols % block_n):
        block_n //= 2
    aligned = out_cols * x.element_size() % 16 == 0 and all(   # TMA: 16-byte rows and base addresses
        t.stride(-1) == 1 and t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0 for t in (x, weight))
    if (not _has_tma(x.device) or not aligned or block_n % (2 * half) or cols % block_n or rotated_cols % block_n
            or half * x.element_size() < 16):
        return None
    out = torch.empty(x.shape[0], out_cols, dtype=x.dtype, device=x.device)
    block_k = block_k * 2 // x.element_size()   # float32 takes the same shared memory as bfloat16
    _paired_matmul_kernel[(triton.cdiv(x.shape[0], block_m) * (cols // block_n),)](
        TensorDescriptor.from_tensor(x, [block_m, block_k]), TensorDescriptor.from_tensor(weight, [block_n, block_k]),
        TensorDescriptor.from_tensor(out, [block_m, block_n // 2 if swiglu else block_n]), cos, sin, x.shape[0],
        x.shape[1], cols, rotated_cols, SWIGLU=swiglu, HALF=half, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP=_GROUP_ROWS, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", WS=specialize,
        num_warps=warps, num_stages=stages)
    return out


def gate_up_swiglu(x: torch.Tensor, weight: torch.Tensor, group: int) -> torch.Tensor | None:
    """silu(gate) * up of x @ weight.T, where weight's rows alternate `group` gate rows and the matching `group`
    up rows [2I, K]; the [T, 2I] product is never written. None where this GPU or these shapes do not fit."""
    # no angles: x stands in for cos and sin, which the SwiGLU variant does not read; and no rotated part, so only
    # the number of columns bounds the block
    return _paired_matmul(x, weight, x, x, weight.shape[0], True, group, SWIGLU_LAUNCH)


def qkv_rotated(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                head_dim: int) -> torch.Tensor | None:
    """x @ weight.T [T, 3 * heads * head_dim], the q and k heads turned as rotate_heads_ turns them; None where
    this GPU or these shapes do not fit."""
    assert cos.is_contiguous() and sin.is_contiguous()
    return _paired_matmul(x, weight, cos, sin, 2 * num_heads * head_dim, False, head_dim // 2, ROPE_LAUNCH)
