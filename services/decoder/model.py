"""The Pixtral language model (Mistral-NeMo architecture) plus the multimodal projector, over a paged KV cache.

With ops.TorchOps it follows transformers' MistralForCausalLM op for op (RMSNorm in float32, rotate-half RoPE with
float32 angles, SDPA with the same scale), so float32 greedy output equals LlavaForConditionalGeneration on CPU;
with ops.TritonOps the same layers run fused kernels on CUDA. Differences from transformers are for serving: q/k/v
and gate/up projections are one matmul each, the tokens of all sequences of a step are flattened into one
[T, hidden] batch, and attention reads and writes the paged cache.

Its weights (from a checkpoint, FP8 or random) are made in weights.py; quantized, the projections of every layer
(fused q/k/v, o, fused gate/up, down) are e4m3 weights with per-channel scales (fp8.Fp8Linear), while the LM head,
embeddings, norms and the projector keep the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.decoder.attention import AttentionBackend, AttentionMetadata
from shared import checkpoint


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
