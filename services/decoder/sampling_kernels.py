"""The sampler's Gumbel noise on CUDA in one kernel: the same integer hash and the same float32 steps as
top_k_top_p.gumbel_at, which spends ~60 tensor operations (each a kernel launch and its host dispatch) on it.

Integer arithmetic is on int64 masked to 32 bits, as the PyTorch version does, so the bits are the same; the
logarithms may round a last bit apart from PyTorch's. The sampler takes every draw on CUDA from this kernel, so a
token's noise is still one value whichever path draws it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _mix32(x):
    """lowbias32 on int64 values in [0, 2**32), as top_k_top_p._mix32."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
    x = ((x ^ (x >> 15)) * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _gumbel_kernel(seed_ptr, step_ptr, ids_ptr, out_ptr, num_columns, ids_row_stride,
                   HAS_IDS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    is_inside = columns < num_columns
    seed = tl.load(seed_ptr + row)
    step = tl.load(step_ptr + row)
    row_hash = _mix32(_mix32(seed & 0xFFFFFFFF) ^ ((seed >> 32) & 0xFFFFFFFF))
    row_hash = _mix32(row_hash ^ _mix32(step & 0xFFFFFFFF))
    if HAS_IDS:
        token_ids = tl.load(ids_ptr + row * ids_row_stride + columns, mask=is_inside, other=0)
    else:   # the whole vocabulary: a token's id is its column
        token_ids = columns.to(tl.int64)
    bits = _mix32(row_hash ^ token_ids)
    uniform = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    noise = -tl.log(-tl.log(uniform))
    tl.store(out_ptr + row.to(tl.int64) * num_columns + columns, noise, mask=is_inside)


def gumbel_at(seed: torch.Tensor, step: torch.Tensor, token_ids: torch.Tensor | None,
              num_columns: int | None = None) -> torch.Tensor:
    """[R, N] float32 noise of `token_ids` [R, N] or [1, N] int64 (None: of every token, N = num_columns), for the
    [R] int64 seeds and steps."""
    num_rows = seed.shape[0]
    if token_ids is not None:
        token_ids = token_ids.contiguous()
        num_columns = token_ids.shape[1]
    out = torch.empty(num_rows, num_columns, dtype=torch.float32, device=seed.device)
    if num_rows == 0 or num_columns == 0:
        return out
    row_stride = 0 if token_ids is None or token_ids.shape[0] == 1 else token_ids.stride(0)
    grid = (num_rows, triton.cdiv(num_columns, BLOCK))
    _gumbel_kernel[grid](seed.contiguous(), step.contiguous(), out if token_ids is None else token_ids, out,
                         num_columns, row_stride, HAS_IDS=token_ids is not None, BLOCK=BLOCK)
    return out
