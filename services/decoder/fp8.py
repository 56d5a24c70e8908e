"""FP8 (e4m3) numbers in the decoder: quantizing to them, the weight container, and the matmul over it.

Weights are quantized per output channel (one float32 scale per row of [N, K], amax / 448), activations of wide
steps per token (W8A8), the KV cache per token and KV head (attention.py). Every scale is the row's largest
magnitude over 448, the largest e4m3 value, so the row's largest element is represented exactly.

`fp8_linear` is the one matmul over an Fp8Weight:
- on CPU, the reference: the weight dequantized to float32 for each matmul, the activations as they are (what
  the tests compare everything else against);
- on CUDA, steps of few rows (up to the rows an Fp8SkinnyPlan measured at start-up, SKINNY_MAX_ROWS without one)
  read the e4m3 weights once in one of matmul_kernels' skinny kernels: their time is that of reading the weights,
  half the bf16 bytes. The plan picks, per weight and row block, the faster of the kernel that upcasts the
  weight tile to the activations' dtype (the product of the dequantized weight and the activations as they are)
  and the one that quantizes the activations per token and multiplies e4m3 by e4m3 (W8A8's numerics, as wide
  steps have them), so a few-row step's output may carry the activations' e4m3 rounding or not, by shape and GPU.
  cuBLAS's FP8 path reads those shapes more slowly than its bf16 one, so it does not serve them;
- wider steps (prompt chunks, large decode batches) quantize their activations per token and run an e4m3 x e4m3
  matmul with both scales in the epilogue: `torch._scaled_mm` (rowwise scales) or this project's Triton kernel,
  chosen by WIDE_MATMUL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0          # the largest finite e4m3fn value
# Rows whose largest magnitude is below this (all-zero rows) get the scale of this magnitude: their codes are 0,
# they dequantize to 0, and no division by zero is made.
MIN_AMAX = 1e-12

# Wide steps' matmul: "scaled_mm" (torch._scaled_mm, cuBLASLt) or "triton" (fp8_kernels.fp8_matmul). Shapes or
# dtypes _scaled_mm cannot take (float32 output, sizes not multiples of 16) run on the Triton kernel either way.
WIDE_MATMUL = "scaled_mm"


@dataclass(frozen=True, slots=True)
class Fp8Weight:
    """A [N, K] weight as e4m3 codes and a float32 scale per output channel: row n is qweight[n] * scale[n]."""

    qweight: torch.Tensor   # [N, K] float8_e4m3fn
    scale: torch.Tensor     # [N] float32

    def __post_init__(self) -> None:
        if self.qweight.dtype != FP8_DTYPE or self.qweight.dim() != 2:
            raise ValueError(f"an FP8 weight is a 2-D {FP8_DTYPE}, got {self.qweight.dtype} {tuple(self.qweight.shape)}")
        if self.scale.dtype != torch.float32 or tuple(self.scale.shape) != (self.qweight.shape[0],):
            raise ValueError(f"an FP8 weight's scale is float32 [{self.qweight.shape[0]}], got {self.scale.dtype} "
                             f"{tuple(self.scale.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def num_bytes(self) -> int:
        return self.qweight.numel() + 4 * self.scale.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] in `dtype` (the product is taken in float32, then rounded once)."""
        return (self.qweight.to(torch.float32) * self.scale[:, None]).to(dtype)

    @staticmethod
    def cat(parts: list[Fp8Weight]) -> Fp8Weight:
        """Concatenated along the output dimension, as the fused q/k/v and gate/up projections are: per-channel
        scales make this exact (each row keeps its own scale)."""
        return Fp8Weight(torch.cat([part.qweight for part in parts]), torch.cat([part.scale for part in parts]))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 codes [..., K], float32 scales [..., 1]), one scale per row of K elements: the row's
    amax / 448, codes rounded to nearest even. This is the reference of every quantizing kernel."""
    x = x.to(torch.float32)
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes [..., K] and their scales [...] -> [..., K] in `dtype` (product in float32)."""
    return (codes.to(torch.float32) * scale[..., None]).to(dtype)


def quantize_weight(weight: torch.Tensor) -> Fp8Weight:
    """[N, K] weight of any float dtype -> Fp8Weight with a scale per output channel (row)."""
    if weight.dim() != 2:
        raise ValueError(f"a weight to quantize is [N, K], got {tuple(weight.shape)}")
    codes, scale = quantize_rows(weight)
    return Fp8Weight(codes, scale[:, 0].contiguous())


class Fp8Linear(nn.Module):
    """A projection holding an Fp8Weight as buffers (`qweight`, `scale`): they move with the module and are in
    its state dict. `weight` gives the Fp8Weight that ops.linear takes, as nn.Linear's gives its tensor."""

    def __init__(self, weight: Fp8Weight) -> None:
        super().__init__()
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scale", weight.scale)

    @property
    def weight(self) -> Fp8Weight:
        return Fp8Weight(self.qweight, self.scale)

    @staticmethod
    def empty(out_features: int, in_features: int, device: torch.device | str) -> Fp8Linear:
        """Uninitialised (meta, to be assigned by load_state_dict)."""
        return Fp8Linear(Fp8Weight(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   torch.empty(out_features, dtype=torch.float32, device=device)))

    def extra_repr(self) -> str:
        return f"in_features={self.qweight.shape[1]}, out_features={self.qweight.shape[0]}, e4m3 per channel"


def reference_linear(x: torch.Tensor, weight: Fp8Weight) -> torch.Tensor:
    """x [T, K] @ dequantized weight.T in float32 -> [T, N] in x's dtype."""
    return F.linear(x.to(torch.float32), weight.dequantize(torch.float32)).to(x.dtype)


def fp8_linear(x: torch.Tensor, weight: Fp8Weight, skinny=None) -> torch.Tensor:
    """x [T, K] @ weight.T -> [T, N] in x's dtype: the reference on CPU, the FP8 kernels on CUDA (a skinny one up
    to `skinny.max_rows` rows, of the kind and launch of a matmul_kernels.Fp8SkinnyPlan measured at start-up, else
    the upcast kernel's default launch up to SKINNY_MAX_ROWS; W8A8 above)."""
    if x.device.type != "cuda":
        return reference_linear(x, weight)
    from services.decoder import matmul_kernels
    if skinny is None:
        if x.shape[0] <= matmul_kernels.SKINNY_MAX_ROWS:
            return matmul_kernels.skinny_linear_fp8(x, weight.qweight, weight.scale)
    elif x.shape[0] <= skinny.max_rows:
        return matmul_kernels.skinny_fp8(x, weight.qweight, weight.scale, *skinny.launch_for(x.shape[0]))
    return w8a8_linear(x, weight)


def _fits_scaled_mm(x: torch.Tensor, weight: Fp8Weight) -> bool:
    # Rowwise-scaled _scaled_mm: bf16 output only; cuBLASLt's FP8 matmul needs K and N multiples of 16.
    n, k = weight.shape
    return x.dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0


def w8a8_linear(x: torch.Tensor, weight: Fp8Weight, matmul: str | None = None) -> torch.Tensor:
    """CUDA: x [T, K] quantized per token, then e4m3 x e4m3 with fp32 accumulation and both scales applied to the
    output -> [T, N] in x's dtype. `matmul` overrides WIDE_MATMUL ("scaled_mm" or "triton")."""
    from services.decoder import fp8_kernels
    codes, x_scale = fp8_kernels.quantize_rows(x)   # [T, K] e4m3, [T, 1] float32
    if (matmul or WIDE_MATMUL) == "scaled_mm" and _fits_scaled_mm(x, weight):
        # mat2 must be column-major: the [N, K] row-major codes transposed are. Scales: [T, 1] and [1, N].
        return torch._scaled_mm(codes, weight.qweight.t(), scale_a=x_scale, scale_b=weight.scale.view(1, -1),
                                out_dtype=x.dtype)
    return fp8_kernels.fp8_matmul(codes, x_scale, weight.qweight, weight.scale, x.dtype)
