"""The Pixtral language model (Mistral-NeMo architecture) plus the multimodal projector, over a paged KV cache.

With ops.TorchOps it follows transformers' MistralForCausalLM op for op (RMSNorm in float32, rotate-half RoPE with
float32 angles, SDPA with the same scale), so float32 greedy output equals LlavaForConditionalGeneration on CPU;
with ops.TritonOps the same layers run fused kernels on CUDA. Differences from transformers are for serving: q/k/v
and gate/up projections are one matmul each, the tokens of all sequences of a step are flattened into one
[T, hidden] batch, and attention reads and writes the paged cache.

`quantize_decoder` turns the projections of every layer (fused q/k/v, o, fused gate/up, down) into e4m3 weights
with per-channel scales (fp8.Fp8Linear); a checkpoint that ships them quantized (`<name>.weight` e4m3 and
`<name>.weight_scale` float32 per output channel) builds them directly. The LM head, embeddings, norms and the
projector keep the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from services.decoder.attention import AttentionBackend, AttentionMetadata
from services.decoder.fp8 import FP8_DTYPE, Fp8Linear, Fp8Weight, quantize_weight
from shared import checkpoint

QUANTIZATIONS = ("fp8",)
# The projections quantize_decoder replaces, by their names inside a DecoderLayer
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@dataclass(frozen=True, slots=True)
class TextModelSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    vision_hidden_size: int   # input width of the projector (features are cached before it)
    image_token_id: int
    bos_token_id: int
    eos_token_id: int

    @staticmethod
    def from_config(config) -> TextModelSpec:
        text = config.text_config
        rope = getattr(text, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise checkpoint.CheckpointError(f"unsupported text rope_type {rope.get('rope_type')}")
        if config.projector_hidden_act != "gelu" or text.hidden_act != "silu":
            raise checkpoint.CheckpointError("expected a gelu projector and a silu text MLP")
        return TextModelSpec(
            vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            rope_theta=float(rope.get("rope_theta", getattr(text, "rope_theta", 1e9))),
            rms_norm_eps=text.rms_norm_eps, max_position_embeddings=text.max_position_embeddings,
            vision_hidden_size=config.vision_config.hidden_size, image_token_id=config.image_token_index,
            bos_token_id=text.bos_token_id if text.bos_token_id is not None else 1,
            eos_token_id=text.eos_token_id if text.eos_token_id is not None else 2)

    @property
    def context_length(self) -> int:
        """Prompt + generated tokens the model serves (checkpoint.context_length)."""
        return min(self.max_position_embeddings, checkpoint.TRAINED_CONTEXT)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies of transformers' default (rotate-half) rope."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


class Attention(nn.Module):
    def __init__(self, spec: TextModelSpec, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.qkv_proj = nn.Linear(spec.hidden_size, q_size + 2 * kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, step: StepContext) -> torch.Tensor:
        cache, ops = step.backend.cache, step.ops
        q = ops.rotary_and_cache(ops.linear(x, self.qkv_proj.weight), positions, step.inv_freq,
                                 cache.keys[self.layer_index], cache.values[self.layer_index], step.meta.slot_mapping,
                                 self.num_heads, self.num_kv_heads, self.head_dim,
                                 *cache.scales(self.layer_index))   # [T, H, D]
        out = step.backend.attend(self.layer_index, q, step.meta)                     # [T, H, D]
        return ops.linear(out.reshape(out.shape[0], -1), self.o_proj.weight)


class MLP(nn.Module):
    def __init__(self, spec: TextModelSpec) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, step: StepContext) -> torch.Tensor:
        ops = step.ops
        return ops.linear(ops.silu_and_mul(ops.linear(x, self.gate_up_proj.weight)), self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, spec: TextModelSpec, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer_index)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x, residual, positions, step: StepContext):
        """The residual stream is carried apart so each add fuses with the norm that follows it."""
        norm = self.input_layernorm
        x, residual = step.ops.add_rms_norm(x, norm.weight, norm.eps, residual)
        x = self.self_attn(x, positions, step)
        norm = self.post_attention_layernorm
        x, residual = step.ops.add_rms_norm(x, norm.weight, norm.eps, residual)
        return self.mlp(x, step), residual


class Projector(nn.Module):
    """Vision features [N, vision_hidden] -> text embeddings [N, hidden] (LlavaMultiModalProjector)."""

    def __init__(self, spec: TextModelSpec) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(spec.vision_hidden_size, spec.hidden_size, bias=True)
        self.linear_2 = nn.Linear(spec.hidden_size, spec.hidden_size, bias=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(features)))


@dataclass(slots=True)
class StepContext:
    """What every layer of one forward pass shares."""

    meta: AttentionMetadata
    backend: AttentionBackend
    ops: object           # TorchOps or TritonOps
    inv_freq: torch.Tensor


class PixtralDecoder(nn.Module):
    def __init__(self, spec: TextModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.projector = Projector(spec)
        self.register_buffer("inv_freq", rope_inv_freq(spec.head_dim, spec.rope_theta), persistent=False)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None,
              image_rows: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with projected image features written at the [IMG] rows (others keep theirs)."""
        hidden = self.embed_tokens(input_ids)                                    # [T, hidden]
        if image_features is not None and image_rows is not None and image_rows.numel():
            projected = self.projector(image_features.to(hidden.dtype))          # [N, hidden]
            hidden = hidden.index_copy(0, image_rows, projected)
        return hidden

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend, ops, logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """[T, hidden] embeddings -> float32 logits of `logits_rows` (all rows if None), [rows, vocab]."""
        step = StepContext(meta, backend, ops, self.inv_freq)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, positions, step)
        if logits_rows is not None:
            hidden, residual = hidden.index_select(0, logits_rows), residual.index_select(0, logits_rows)
        hidden, _ = ops.add_rms_norm(hidden, self.norm.weight, self.norm.eps, residual)
        return ops.linear(hidden, self.lm_head.weight).float()


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
