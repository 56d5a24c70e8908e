"""The small operations between the matmuls, in two interchangeable implementations.

`TorchOps` follows transformers' Mistral op for op (it is what makes float32 CPU output equal
LlavaForConditionalGeneration). `TritonOps` fuses them into single kernels for CUDA (kernels.py).

Both take a weight as a tensor or as an fp8.Fp8Weight (`linear`), and a KV cache in the model's dtype or in e4m3
with scales (`rotary_and_cache`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from services.decoder.fp8 import Fp8Weight, fp8_linear, quantize_rows

log = logging.getLogger(__name__)


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
                         num_heads: int, num_kv_heads: int, head_dim: int, k_scales: torch.Tensor | None = None,
                         v_scales: torch.Tensor | None = None) -> torch.Tensor:
        """`k_scales`, `v_scales` [slots, Hkv]: the caches hold e4m3 codes, quantized per token and KV head."""
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        cos, sin = self._cos_sin(positions, inv_freq, qkv.dtype)
        q = self._rotate(q.view(-1, num_heads, head_dim), cos, sin)
        k = self._rotate(k.reshape(-1, num_kv_heads, head_dim), cos, sin)
        v = v.reshape(-1, num_kv_heads, head_dim)
        if k_scales is None or v_scales is None:
            k_cache.index_copy_(0, slot_mapping, k)
            v_cache.index_copy_(0, slot_mapping, v)
        else:
            _write_e4m3(k_cache, k_scales, slot_mapping, k)
            _write_e4m3(v_cache, v_scales, slot_mapping, v)
        return q

    @staticmethod
    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor | Fp8Weight) -> torch.Tensor:
        if isinstance(weight, Fp8Weight):
            return fp8_linear(x, weight)
        return F.linear(x, weight)


def _write_e4m3(cache: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """rows [T, Hkv, D] -> e4m3 codes at cache[slots] and their scales at scales[slots]."""
    codes, scale = quantize_rows(rows)
    # index_copy_ has no e4m3 kernel on CPU; the codes' bytes copy the same
    cache.view(torch.uint8).index_copy_(0, slots, codes.view(torch.uint8))
    scales.index_copy_(0, slots, scale[..., 0])


class TritonOps:
    def __init__(self) -> None:
        from services.decoder import kernels, matmul_kernels
        from shared import kernels as shared_kernels
        self.kernels = matmul_kernels
        self.add_rms_norm = shared_kernels.add_rms_norm
        self.rotary_and_cache = kernels.rotary_and_cache
        self.silu_and_mul = shared_kernels.silu_and_mul
        self.skinny_shapes: set[tuple[int, int]] | None = None   # None: every weight (until choose_linear)
        # FP8 weights: the skinny kernel's launches and the rows up to which it beats W8A8, by shape (choose_linear)
        self.fp8_skinny: dict[tuple[int, int], object] = {}

    def linear(self, x: torch.Tensor, weight: torch.Tensor | Fp8Weight) -> torch.Tensor:
        if isinstance(weight, Fp8Weight):
            return fp8_linear(x, weight, self.fp8_skinny.get(tuple(weight.shape)))
        if self.skinny_shapes is None or tuple(weight.shape) in self.skinny_shapes:
            return self.kernels.skinny_linear(x, weight)   # cuBLAS itself past SKINNY_MAX_ROWS rows
        return F.linear(x, weight)

    def warm_up(self, model, block_size: int, is_fp8_cache: bool, device: torch.device) -> None:
        """Every kernel variant compiled and the matmul kernels chosen for this GPU, at start-up."""
        from services.decoder import kernels
        from services.decoder.matmul_kernels import SKINNY_MAX_ROWS
        from shared.sdpa import warm_up_cudnn
        spec, dtype = model.spec, model.embed_tokens.weight.dtype
        kernels.warm_up(dtype, device, spec.num_heads, spec.num_kv_heads, spec.head_dim, block_size, is_fp8_cache)
        warm_up_cudnn(spec.num_heads, spec.num_kv_heads, spec.head_dim, True, dtype, device)
        layer = model.layers[0]
        self.choose_linear([layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight,
                            layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight, model.lm_head.weight])
        log.info("weight matmuls of up to %d rows on the Triton kernel for weights %s, cuBLAS for the others",
                 SKINNY_MAX_ROWS, sorted(self.skinny_shapes))
        for shape, plan in self.fp8_skinny.items():
            log.info("FP8 weight %s: the skinny kernel up to %d rows (launches %s), W8A8 above", shape,
                     plan.max_rows, plan.launches)

    def choose_linear(self, weights: list[torch.Tensor | Fp8Weight]) -> None:
        """Measures, once on this GPU, which weights' small-batch matmuls run on the Triton kernel, and for FP8
        weights up to how many rows the skinny kernel beats W8A8 (at least SKINNY_MAX_ROWS: cuBLAS's FP8 matmul
        reads a few rows' weights slowly)."""
        plain = [w for w in weights if isinstance(w, torch.Tensor)]
        self.skinny_shapes = self.kernels.faster_on_skinny(plain)
        dtype = plain[0].dtype if plain else torch.bfloat16   # the activations': the LM head's (never FP8)
        for weight in weights:
            if isinstance(weight, Fp8Weight) and tuple(weight.shape) not in self.fp8_skinny:
                self.fp8_skinny[tuple(weight.shape)] = self.kernels.fp8_skinny_plan(weight, dtype)
