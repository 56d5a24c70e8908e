"""The Pixtral vision tower, for batches of images of any sizes, without a dense attention mask.

Same function as transformers' PixtralVisionModel (patch conv, RMSNorm, 2-D axial RoPE, SwiGLU layers) with
images packed differently: every token-wise layer (norms, projections, MLP) runs on the patches of all images
of a batch at once, and attention runs per group of same-sized images as a batched SDPA with no mask, instead of
one sequence of all patches under an (N x N) block-diagonal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.sdpa import attention


GATE_UP_GROUP = 64   # gate rows, then as many up rows, in turn in the fused gate/up weight (VisionSpec.gate_up_group)
# Eager passes of fewer rows run cuBLAS and the separate RoPE and SwiGLU kernels instead of the paired matmuls
# (TritonVisionOps): such passes are bound by the host's launch time, and launching a paired matmul (three TMA
# descriptors) costs the host more than the two launches it replaces (bench/gpu_profile.py, `host_*`, `eager_*`;
# docs/benchmarks.md). A pass captured as a CUDA graph launches once, so it takes the paired matmuls at any size.
PAIRED_EAGER_MIN_ROWS = 16384


@dataclass(frozen=True, slots=True)
class VisionSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    rope_theta: float
    num_channels: int = 3
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def gate_up_group(self) -> int:
        """The fused gate/up weight's rows alternate this many gate rows and the matching up rows, so that a tile
        of its matmul holds both halves of the SwiGLU it feeds (services/vision/kernels.py)."""
        return GATE_UP_GROUP if self.intermediate_size % GATE_UP_GROUP == 0 else self.intermediate_size

    @staticmethod
    def from_config(config) -> VisionSpec:
        rope = getattr(config, "rope_parameters", None) or {}
        if config.hidden_act != "silu":
            raise ValueError(f"expected the Pixtral vision activation silu, got {config.hidden_act}")
        return VisionSpec(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                          config.num_attention_heads, config.patch_size,
                          float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
                          config.num_channels)


@dataclass(frozen=True, slots=True)
class PatchGroup:
    """Images of one size within a packed batch: rows start .. start + count * grid_h * grid_w."""

    start: int
    count: int
    grid_height: int
    grid_width: int

    @property
    def num_patches(self) -> int:
        return self.grid_height * self.grid_width


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class TorchVisionOps:
    """The op order of transformers' PixtralVisionModel."""

    @staticmethod
    def add_rms_norm(x, weight, eps, residual=None):
        if residual is not None:
            x = residual + x
        return rms_norm(x, weight, eps), x

    @staticmethod
    def qkv_rotated(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                    dim: int):
        """The qkv projection -> q, k (turned by RoPE), v [T, heads, dim]."""
        q, k, v = F.linear(x, weight).chunk(3, dim=-1)
        cos2, sin2 = (torch.cat([t, t], dim=-1).to(x.dtype)[:, None] for t in (cos, sin))
        return (apply_rotary(q.view(-1, heads, dim), cos2, sin2), apply_rotary(k.view(-1, heads, dim), cos2, sin2),
                v.view(-1, heads, dim))

    @staticmethod
    def gate_up_swiglu(x: torch.Tensor, weight: torch.Tensor, group: int) -> torch.Tensor:
        """silu(gate) * up of the gate/up projection, whose columns alternate `group` gate and `group` up."""
        hidden = F.linear(x, weight).view(x.shape[0], -1, 2, group)
        return (F.silu(hidden[:, :, 0]) * hidden[:, :, 1]).reshape(x.shape[0], -1)


class TritonVisionOps:
    """The same, fused into Triton kernels (CUDA): the shared norm kernel, and the qkv and gate/up projections
    with RoPE and SwiGLU in their epilogues (`paired_matmuls`; off: cuBLAS, then the rotation and the shared
    SwiGLU kernel, as separate kernels)."""

    def __init__(self, paired_matmuls: bool = True) -> None:
        from services.vision import kernels as vision_kernels
        from shared import kernels
        self.add_rms_norm = kernels.add_rms_norm
        self.silu_and_mul = kernels.silu_and_mul
        self.kernels = vision_kernels
        self.paired_matmuls = paired_matmuls

    def qkv_rotated(self, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                    dim: int):
        qkv = self.kernels.qkv_rotated(x, weight, cos, sin, heads, dim) if self.paired_matmuls else None
        if qkv is None:
            qkv = F.linear(x, weight)
            self.kernels.rotate_heads_(qkv, cos, sin, 2 * heads, dim)   # q and k heads, in place
        q, k, v = qkv.chunk(3, dim=-1)
        return q.view(-1, heads, dim), k.view(-1, heads, dim), v.view(-1, heads, dim)

    def gate_up_swiglu(self, x: torch.Tensor, weight: torch.Tensor, group: int) -> torch.Tensor:
        out = self.kernels.gate_up_swiglu(x, weight, group) if self.paired_matmuls else None
        return self.silu_and_mul(F.linear(x, weight), group) if out is None else out


def axial_angles(grid_height: int, grid_width: int, head_dim: int, theta: float,
                 device: torch.device) -> torch.Tensor:
    """[grid_h * grid_w, head_dim] float32 RoPE angles: rows by patch row, the first quarter of the frequencies
    (the even ones) turn with the row index, the next quarter (the odd ones) with the column index."""
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    rows = torch.arange(grid_height, device=device, dtype=torch.float32)
    cols = torch.arange(grid_width, device=device, dtype=torch.float32)
    by_row = rows[:, None, None] * base[None, None, 0::2]                      # [h, 1, D/4]
    by_col = cols[None, :, None] * base[None, None, 1::2]                      # [1, w, D/4]
    half = torch.cat([by_row.expand(-1, grid_width, -1), by_col.expand(grid_height, -1, -1)], dim=-1)
    return torch.cat([half, half], dim=-1).reshape(grid_height * grid_width, head_dim)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class VisionLayer(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.spec = spec
        self.attention_norm = nn.Parameter(torch.ones(spec.hidden_size))
        self.qkv_proj = nn.Linear(spec.hidden_size, 3 * spec.hidden_size, bias=False)
        self.o_proj = nn.Linear(spec.hidden_size, spec.hidden_size, bias=False)
        self.ffn_norm = nn.Parameter(torch.ones(spec.hidden_size))
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                groups: list[PatchGroup], ops) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is carried apart so each add fuses with the norm that follows it."""
        spec = self.spec
        heads, dim = spec.num_heads, spec.head_dim
        normed, residual = ops.add_rms_norm(x, self.attention_norm, spec.rms_norm_eps, residual)
        q, k, v = ops.qkv_rotated(normed, self.qkv_proj.weight, cos, sin, heads, dim)   # [N, H, d] each
        out = torch.empty_like(q) if len(groups) > 1 else None
        for group in groups:
            rows = slice(group.start, group.start + group.count * group.num_patches)
            shape = (group.count, group.num_patches, heads, dim)
            attended = attention(*(t[rows].view(shape).transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
            if out is None:   # one size in the batch: no copy into a shared output
                out = attended.reshape(-1, heads, dim)
            else:
                out[rows] = attended.reshape(-1, heads, dim)
        normed, residual = ops.add_rms_norm(self.o_proj(out.reshape(out.shape[0], -1)), self.ffn_norm,
                                            spec.rms_norm_eps, residual)
        return self.down_proj(ops.gate_up_swiglu(normed, self.gate_up_proj.weight, spec.gate_up_group)), residual


class VisionTower(nn.Module):
    def __init__(self, spec: VisionSpec, use_fused_kernels: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.ops = TritonVisionOps() if use_fused_kernels else TorchVisionOps()
        self.eager_ops = TritonVisionOps(paired_matmuls=False) if use_fused_kernels else self.ops
        # The checkpoint's patch convolution (kernel = stride = patch size), as the matmul it is: see embed_patches
        self.patch_embedding = nn.Linear(spec.num_channels * spec.patch_size ** 2, spec.hidden_size, bias=False)
        self.ln_pre = nn.Parameter(torch.ones(spec.hidden_size))
        self.layers = nn.ModuleList(VisionLayer(spec) for _ in range(spec.num_layers))

    def pack(self, sizes: list[tuple[int, int]]) -> tuple[list[int], list[PatchGroup]]:
        """Orders images by size (same-sized ones adjacent) -> (order, groups)."""
        order = sorted(range(len(sizes)), key=lambda i: sizes[i])
        groups, start = [], 0
        for index in order:
            grid = (sizes[index][0] // self.spec.patch_size, sizes[index][1] // self.spec.patch_size)
            if groups and (groups[-1].grid_height, groups[-1].grid_width) == grid:
                last = groups[-1]
                groups[-1] = PatchGroup(last.start, last.count + 1, *grid)
            else:
                groups.append(PatchGroup(start, 1, *grid))
            start += grid[0] * grid[1]
        return order, groups

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """[count, C, H, W] -> [count, H/p * W/p, hidden], patches in row-major order.

        The patch convolution computed as one matmul of the flattened patches: cuDNN's kernel for this convolution
        (3 input channels, stride = kernel) took over ten times as long (bench/gpu_vision.py, `patch_*`)."""
        count, channels, height, width = images.shape
        p = self.spec.patch_size
        patches = images.reshape(count, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        return self.patch_embedding(patches.reshape(count, (height // p) * (width // p), channels * p * p))

    def forward(self, pixels: list[torch.Tensor], captured: bool = False) -> list[torch.Tensor]:
        """[(3, H, W)] with H, W multiples of the patch size -> [(H/16 * W/16, hidden)], in the same order.
        `captured`: the pass is captured into a CUDA graph, or warms one up (see PAIRED_EAGER_MIN_ROWS)."""
        order, groups = self.pack([tuple(p.shape[1:]) for p in pixels])
        dtype = self.patch_embedding.weight.dtype
        patches, angles = [], []
        for group in groups:
            members = [pixels[i] for i in order[len(patches):len(patches) + group.count]]
            patches.extend(self.embed_patches(torch.stack(members).to(dtype)))   # count x [gh * gw, D]
            angles.append(axial_angles(group.grid_height, group.grid_width, self.spec.head_dim,
                                       self.spec.rope_theta, members[0].device).repeat(group.count, 1))
        x, _ = self.ops.add_rms_norm(torch.cat(patches), self.ln_pre, self.spec.rms_norm_eps)   # [N, D]
        angles = torch.cat(angles)[:, :self.spec.head_dim // 2]                   # the second half repeats it
        cos, sin = angles.cos().contiguous(), angles.sin().contiguous()           # [N, D / 2] float32
        ops = self.ops if captured or x.shape[0] >= PAIRED_EAGER_MIN_ROWS else self.eager_ops
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, groups, ops)
        x = x + residual
        features = [None] * len(pixels)
        start = 0
        for position, index in enumerate(order):
            length = patches[position].shape[0]
            features[index] = x[start:start + length]
            start += length
        return features


def interleave(gate: torch.Tensor, up: torch.Tensor, group: int) -> torch.Tensor:
    """[I, K] gate and up weights -> [2I, K], alternating `group` rows of each (VisionSpec.gate_up_group)."""
    return torch.stack([gate.view(-1, group, gate.shape[1]), up.view(-1, group, up.shape[1])], 1).flatten(0, 2)


def state_from_checkpoint(tensors: dict[str, torch.Tensor], spec: VisionSpec) -> dict[str, torch.Tensor]:
    """transformers' PixtralVisionModel names -> this module's (q/k/v fused, gate/up fused and interleaved)."""
    conv = tensors.pop("patch_conv.weight")                      # [hidden, C, p, p]: (c, row, column) order
    state = {"patch_embedding.weight": conv.reshape(conv.shape[0], -1), "ln_pre": tensors.pop("ln_pre.weight")}
    for i in range(spec.num_layers):
        src, dst = f"transformer.layers.{i}.", f"layers.{i}."
        state[dst + "qkv_proj.weight"] = torch.cat([tensors.pop(f"{src}attention.{n}_proj.weight") for n in "qkv"])
        state[dst + "o_proj.weight"] = tensors.pop(src + "attention.o_proj.weight")
        state[dst + "gate_up_proj.weight"] = interleave(tensors.pop(src + "feed_forward.gate_proj.weight"),
                                                        tensors.pop(src + "feed_forward.up_proj.weight"),
                                                        spec.gate_up_group)
        state[dst + "down_proj.weight"] = tensors.pop(src + "feed_forward.down_proj.weight")
        state[dst + "attention_norm"] = tensors.pop(src + "attention_norm.weight")
        state[dst + "ffn_norm"] = tensors.pop(src + "ffn_norm.weight")
    if tensors:
        raise ValueError(f"unexpected vision tensors: {sorted(tensors)[:5]}")
    return state
