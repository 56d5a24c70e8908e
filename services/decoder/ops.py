"""The small operations between the matmuls, in two interchangeable implementations.

`TorchOps` follows transformers' Mistral op for op (it is what makes float32 CPU output equal
LlavaForConditionalGeneration). `TritonOps` fuses them into single kernels for CUDA (kernels.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchOps:
    def __init__(self) -> None:
        self._angles: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def add_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = residual + x
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * normed.to(x.dtype), x

    def _cos_sin(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        # Every layer of a forward pass rotates by the same positions: compute the angles once.
        if self._angles is None or self._angles[0] is not positions:
            freqs = positions.float()[:, None] * inv_freq[None, :]     # [T, D / 2]
            angles = torch.cat((freqs, freqs), dim=-1)                 # [T, D]
            self._angles = (positions, angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None])
        return self._angles[1], self._angles[2]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def rotary_and_cache(self, qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        cos, sin = self._cos_sin(positions, inv_freq, qkv.dtype)
        q = self._rotate(q.view(-1, num_heads, head_dim), cos, sin)
        k = self._rotate(k.reshape(-1, num_kv_heads, head_dim), cos, sin)
        k_cache.index_copy_(0, slot_mapping, k)
        v_cache.index_copy_(0, slot_mapping, v.reshape(-1, num_kv_heads, head_dim))
        return q

    @staticmethod
    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    linear = staticmethod(F.linear)


class TritonOps:
    def __init__(self) -> None:
        from services.decoder import kernels
        from shared import kernels as shared_kernels
        self.kernels = kernels
        self.add_rms_norm = shared_kernels.add_rms_norm
        self.rotary_and_cache = kernels.rotary_and_cache
        self.silu_and_mul = shared_kernels.silu_and_mul
        self.skinny_shapes: set[tuple[int, int]] | None = None   # None: every weight (until choose_linear)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.skinny_shapes is None or tuple(weight.shape) in self.skinny_shapes:
            return self.kernels.skinny_linear(x, weight)   # cuBLAS itself past SKINNY_MAX_ROWS rows
        return F.linear(x, weight)

    def choose_linear(self, weights: list[torch.Tensor]) -> None:
        """Measures, once on this GPU, which weights' small-batch matmuls run on the Triton kernel."""
        self.skinny_shapes = self.kernels.faster_on_skinny(weights)
