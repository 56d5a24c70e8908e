"""The decoder's weights: read from a checkpoint (only `language_model.*` and `multi_modal_projector.*`), fused into
its q/k/v and gate/up projections, quantized to FP8 at load (`quantize_decoder`), or random at a spec's shape.

A checkpoint that ships its projections quantized (`<name>.weight` e4m3 and `<name>.weight_scale` float32 per
output channel) builds fp8.Fp8Linear modules directly; `quantize_decoder` makes the same from a bf16/fp32 model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from services.decoder.fp8 import FP8_DTYPE, Fp8Linear, Fp8Weight, quantize_weight
from services.decoder.model import PixtralDecoder, TextModelSpec, rope_inv_freq
from shared import checkpoint

QUANTIZATIONS = ("fp8",)
# The projections quantize_decoder replaces, by their names inside a DecoderLayer
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def _fuse(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Checkpoint names -> this module's names, concatenating q/k/v and gate/up. Pre-quantized projections
    (`<name>.weight` e4m3 with `<name>.weight_scale`) become an Fp8Linear's `qweight` and `scale`."""
    out = {}
    for name, tensor in tensors.items():
        if name.startswith("layers."):
            continue
        out[name] = tensor
    for i in range(num_layers):
        p = f"layers.{i}."
        _fuse_projection(tensors, [p + f"self_attn.{n}_proj" for n in "qkv"], p + "self_attn.qkv_proj", out)
        _fuse_projection(tensors, [p + "self_attn.o_proj"], p + "self_attn.o_proj", out)
        _fuse_projection(tensors, [p + "mlp.gate_proj", p + "mlp.up_proj"], p + "mlp.gate_up_proj", out)
        _fuse_projection(tensors, [p + "mlp.down_proj"], p + "mlp.down_proj", out)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[p + norm + ".weight"] = tensors.pop(p + norm + ".weight")
    return out


def _fuse_projection(tensors: dict[str, torch.Tensor], sources: list[str], target: str,
                     out: dict[str, torch.Tensor]) -> None:
    """The weights of `sources` (checkpoint projections) concatenated into `target`'s, taken from `tensors`."""
    quantized = [source + ".weight_scale" in tensors for source in sources]
    if not any(quantized):
        out[target + ".weight"] = torch.cat([tensors.pop(source + ".weight") for source in sources], dim=0)
        return
    if not all(quantized):
        raise checkpoint.CheckpointError(f"{', '.join(sources)}: some are FP8 with scales and some are not")
    parts = []
    for source in sources:
        weight, scale = tensors.pop(source + ".weight"), tensors.pop(source + ".weight_scale")
        if weight.dtype != FP8_DTYPE:
            raise checkpoint.CheckpointError(f"{source}.weight has a weight_scale but is {weight.dtype}, not "
                                             f"{FP8_DTYPE}")
        if scale.numel() != weight.shape[0]:
            raise checkpoint.CheckpointError(f"{source}.weight_scale has {scale.numel()} values for "
                                             f"{weight.shape[0]} output channels (one scale per channel expected)")
        parts.append(Fp8Weight(weight, scale.reshape(-1).to(torch.float32)))
    fused = Fp8Weight.cat(parts)
    out[target + ".qweight"], out[target + ".scale"] = fused.qweight, fused.scale


def _replace_projections(model: PixtralDecoder, make) -> None:
    """Each layer's projection module p (an nn.Linear) becomes make(name, p) where that is not None."""
    for index, layer in enumerate(model.layers):
        for name in PROJECTIONS:
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name)
            replacement = make(f"layers.{index}.{name}", getattr(parent, child))
            if replacement is not None:
                setattr(parent, child, replacement)


@torch.no_grad()
def quantize_decoder(model: PixtralDecoder) -> PixtralDecoder:
    """Replaces (in place) each layer's fused q/k/v, o, fused gate/up and down projection weights by e4m3 ones
    with a float32 scale per output channel; the LM head, embeddings, norms and projector are left as they are.
    Each bf16/fp32 weight is freed as its FP8 one is made, so this needs little more memory than the model."""
    def quantize(name: str, module: nn.Module) -> nn.Module | None:
        return Fp8Linear(quantize_weight(module.weight)) if isinstance(module, nn.Linear) else None
    _replace_projections(model, quantize)
    return model


def decoder_from_tensors(spec: TextModelSpec, text: dict[str, torch.Tensor], projector: dict[str, torch.Tensor],
                         device: torch.device) -> PixtralDecoder:
    """A decoder from checkpoint tensors already renamed by checkpoint.part_renamer (consumed). Projections given
    pre-quantized (`<name>.weight` float8_e4m3fn [out, in] and `<name>.weight_scale` float32 [out]) are kept so."""
    state = _fuse(text, spec.num_layers)
    state.update({"projector." + name: tensor for name, tensor in projector.items()})
    with torch.device("meta"):
        model = PixtralDecoder(spec)

    def placeholder(name: str, module: nn.Linear) -> nn.Module | None:
        if name + ".qweight" not in state:
            return None
        return Fp8Linear.empty(module.out_features, module.in_features, "meta")
    _replace_projections(model, placeholder)
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers are not in the checkpoint: rebuild them on the real device.
    model.inv_freq = rope_inv_freq(spec.head_dim, spec.rope_theta, device)
    return model.eval().requires_grad_(False)


def load_decoder(model_dir: Path, dtype: torch.dtype, device: torch.device,
                 quantization: str | None = None) -> PixtralDecoder:
    """Reads only `language_model.*` and `multi_modal_projector.*` from the checkpoint. `quantization="fp8"`:
    the projections are quantized to e4m3 as they are loaded (quantize_decoder)."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {quantization!r}")
    config = checkpoint.load_config(model_dir)
    spec = TextModelSpec.from_config(config)
    seed = checkpoint.random_weights_seed(model_dir)
    if seed is not None:
        model = random_decoder(spec, dtype, device, seed)
    else:
        text = checkpoint.read_tensors(model_dir, checkpoint.part_renamer("language_model"), dtype, device)
        projector = checkpoint.read_tensors(model_dir, checkpoint.part_renamer("projector"), dtype, device)
        model = decoder_from_tensors(spec, text, projector, device)
    return quantize_decoder(model) if quantization == "fp8" else model


def random_decoder(spec: TextModelSpec, dtype: torch.dtype, device: torch.device, seed: int = 0) -> PixtralDecoder:
    """Random weights at `spec`'s shape, made directly on `device` (benchmarks of the full shape)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = PixtralDecoder(spec).to(dtype)
    model = model.to_empty(device=device)   # made in its dtype: no float32 copy of the whole model first
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
            continue
        param.data.normal_(0.0, 0.02)
    model.inv_freq = rope_inv_freq(spec.head_dim, spec.rope_theta, device)
    return model.eval().requires_grad_(False)
