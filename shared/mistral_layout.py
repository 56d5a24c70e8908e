"""Mistral's own checkpoint layout, read as the Hugging Face one (and written, for tiny checkpoints).

A directory holds `params.json`, `tekken.json` and `consolidated.safetensors`, or shards
`consolidated-0000N-of-0000M.safetensors` listed by `consolidated.safetensors.index.json` (the files vLLM reads with
`--load-format mistral`), as mistralai/Pixtral-12B-2409 is published. What differs from mistral-community/pixtral-12b,
and how the reader undoes it, following transformers' `convert_pixtral_weights_to_hf.py`:

- params.json instead of config.json: `config_from_params` builds the LlavaConfig that the conversion gives.
- Tensor names (`tok_embeddings`, `layers.N.attention.wq`, `vision_encoder.*`, `vision_language_adapter.w_in`, ...):
  `hf_name` maps each to its name in the Hugging Face files, so part_renamer and every role stay as they are.
- The rows of wq and wk, in the text model and in the vision encoder: Mistral's RoPE turns each interleaved pair
  of a head's dimensions (2i, 2i + 1) by one angle, transformers' (and this project's models) turn dimension i with
  i + head_dim / 2. Reordering the rows of wq and wk within each head (`rope_row_order`) makes the second compute
  what the first does: the same attention scores, the same outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.checkpoint import CheckpointError, safetensors_keys

PARAMS_FILE = "params.json"
SINGLE_FILE = "consolidated.safetensors"
INDEX_FILE = "consolidated.safetensors.index.json"
# What transformers' conversion of Pixtral-12B sets (params.json has no such field): mistral-community/pixtral-12b.
DEFAULT_MAX_POSITION_EMBEDDINGS = 1024000

# Per layer: Mistral's name -> the Hugging Face file's name.
_TEXT_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
_VISION_LAYER = {
    "attention.wq.weight": "attention.q_proj.weight",
    "attention.wk.weight": "attention.k_proj.weight",
    "attention.wv.weight": "attention.v_proj.weight",
    "attention.wo.weight": "attention.o_proj.weight",
    "attention_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "feed_forward.gate_proj.weight",
    "feed_forward.w2.weight": "feed_forward.down_proj.weight",
    "feed_forward.w3.weight": "feed_forward.up_proj.weight",
}
_OTHERS = {
    "tok_embeddings.weight": "language_model.model.embed_tokens.weight",
    "norm.weight": "language_model.model.norm.weight",
    "output.weight": "language_model.lm_head.weight",
    "vision_encoder.patch_conv.weight": "vision_tower.patch_conv.weight",
    "vision_encoder.ln_pre.weight": "vision_tower.ln_pre.weight",
    "vision_language_adapter.w_in.weight": "multi_modal_projector.linear_1.weight",
    "vision_language_adapter.w_in.bias": "multi_modal_projector.linear_1.bias",
    "vision_language_adapter.w_out.weight": "multi_modal_projector.linear_2.weight",
    "vision_language_adapter.w_out.bias": "multi_modal_projector.linear_2.bias",
}
# (Mistral's prefix of layer N's names, the Hugging Face one, the names within the layer)
_LAYERS = [
    ("vision_encoder.transformer.layers.", "vision_tower.transformer.layers.", _VISION_LAYER),
    ("layers.", "language_model.model.layers.", _TEXT_LAYER),
]
# params.json fields of Mistral models this service does not serve, and why.
_UNSUPPORTED_PARAMS = {
    "quantization": "Mistral's own quantized layout",
    "moe": "mixture of experts",
    "yarn": "YaRN rope scaling",
    "llama_4_scaling": "Llama-4 attention scaling",
    "qk_nope_head_dim": "multi-head latent attention",
    "sliding_window": "sliding-window attention",
    "tied_embeddings": "an output layer tied to the embeddings",
}
_UNSUPPORTED_VISION = {
    "spatial_merge_size": (1, "spatial merge (Mistral-Small-3.1)"),
    "mm_projector_id": ("", "a patch-merging projector (Mistral-Small-3.1)"),
    "add_pre_mm_projector_layer_norm": (False, "a norm before the projector (Mistral-Small-3.1)"),
    "adapter_bias": (True, "a projector without biases"),
}


def is_mistral_layout(model_dir: Path) -> bool:
    """params.json and no config.json (a directory with both is read as the Hugging Face layout)."""
    model_dir = Path(model_dir)
    return (model_dir / PARAMS_FILE).is_file() and not (model_dir / "config.json").is_file()


def _renamed(name: str, others: dict[str, str], layers: list[tuple[str, str, dict[str, str]]]) -> str | None:
    if name in others:
        return others[name]
    for prefix, new_prefix, names in layers:
        layer, _, rest = name.removeprefix(prefix).partition(".")
        if name.startswith(prefix) and layer.isdigit() and rest in names:
            return f"{new_prefix}{layer}.{names[rest]}"
    return None


def hf_name(key: str) -> str | None:
    """Mistral's tensor name -> the name in mistral-community/pixtral-12b's files; None for a name Pixtral has not."""
    return _renamed(key, _OTHERS, _LAYERS)


def mistral_name(name: str) -> str | None:
    """The inverse of hf_name."""
    return _renamed(name, {v: k for k, v in _OTHERS.items()},
                    [(new, old, {v: k for k, v in names.items()}) for old, new, names in _LAYERS])


def num_rope_heads(name: str, config) -> int:
    """Heads of a q/k projection (by its Hugging Face name) whose rows RoPE pairs differently; 0 for others."""
    if name.startswith("vision_tower.") and name.endswith(("attention.q_proj.weight", "attention.k_proj.weight")):
        return config.vision_config.num_attention_heads
    if name.endswith("self_attn.q_proj.weight"):
        return config.text_config.num_attention_heads
    if name.endswith("self_attn.k_proj.weight"):
        return config.text_config.num_key_value_heads
    return 0


def rope_row_order(num_rows: int, num_heads: int) -> torch.Tensor:
    """[num_rows] int64: for each row of a q/k weight in transformers' layout, the row of Mistral's it is.

    Within a head of d rows, row i < d/2 is Mistral's row 2i (the first of pair i) and row d/2 + i its row 2i + 1,
    as transformers' conversion (`permute_for_rope`) reorders them."""
    head_dim = num_rows // num_heads
    if head_dim * num_heads != num_rows or head_dim % 2:
        raise CheckpointError(f"a q/k weight of {num_rows} rows does not split into {num_heads} heads of even size")
    return torch.arange(num_rows).view(num_heads, head_dim // 2, 2).transpose(1, 2).reshape(num_rows)


def to_rotate_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Mistral's wq/wk [heads * d, in] -> transformers' q_proj/k_proj."""
    return weight.index_select(0, rope_row_order(weight.shape[0], num_heads))


def to_interleaved(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """transformers' q_proj/k_proj -> Mistral's wq/wk (the inverse of to_rotate_half)."""
    return weight.index_select(0, torch.argsort(rope_row_order(weight.shape[0], num_heads)))


def tensor_keys(model_dir: Path) -> dict[str, tuple[Path, str]]:
    """Hugging Face name -> (file, Mistral's name in it), for every tensor of the checkpoint."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        files = {key: model_dir / file for key, file in json.loads(index.read_text())["weight_map"].items()}
    elif (model_dir / SINGLE_FILE).is_file():
        files = dict.fromkeys(safetensors_keys(model_dir / SINGLE_FILE), model_dir / SINGLE_FILE)
    else:
        raise CheckpointError(f"{model_dir}: params.json but neither {INDEX_FILE} nor {SINGLE_FILE}")
    mapped = {}
    for key, file in files.items():
        name = hf_name(key)
        if name is None:
            raise CheckpointError(f"{file.name}: tensor {key} is not one of Pixtral's")
        mapped[name] = (file, key)
    return mapped


def load_config(model_dir: Path):
    path = Path(model_dir) / PARAMS_FILE
    try:
        params = json.loads(path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{path.name}: not JSON ({error})") from None
    return config_from_params(params)


def config_from_params(params: dict):
    """params.json -> the LlavaConfig of the same model converted by transformers (mistral-community/pixtral-12b)."""
    from transformers import LlavaConfig, MistralConfig, PixtralVisionConfig

    for field, what in _UNSUPPORTED_PARAMS.items():
        if params.get(field):
            raise CheckpointError(f"params.json: {field} ({what}) is not supported")
    if params.get("activation", "silu") != "silu":
        raise CheckpointError(f"params.json: activation {params['activation']!r} is not supported (only silu)")
    vision = params.get("vision_encoder") or (params.get("multimodal") or {}).get("vision_encoder_args")
    if not vision:
        raise CheckpointError("params.json: no vision_encoder (a text-only model)")
    for field, (supported, what) in _UNSUPPORTED_VISION.items():
        if vision.get(field, supported) != supported:
            raise CheckpointError(f"params.json: vision_encoder.{field} {vision[field]!r} ({what}) is not supported")
    try:
        vision_config = PixtralVisionConfig(
            hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
            num_hidden_layers=vision["num_hidden_layers"], num_attention_heads=vision["num_attention_heads"],
            num_channels=vision["num_channels"], image_size=vision["image_size"], patch_size=vision["patch_size"],
            hidden_act="silu", rope_parameters={"rope_type": "axial", "rope_theta": float(vision["rope_theta"])})
        image_token_id = vision["image_token_id"]
    except KeyError as error:
        raise CheckpointError(f"params.json: no vision_encoder.{error.args[0]}") from None
    try:
        text_config = MistralConfig(
            vocab_size=params["vocab_size"], hidden_size=params["dim"], intermediate_size=params["hidden_dim"],
            num_hidden_layers=params["n_layers"], num_attention_heads=params["n_heads"],
            num_key_value_heads=params["n_kv_heads"], head_dim=params["head_dim"], hidden_act="silu",
            max_position_embeddings=params.get("max_position_embeddings") or params.get("max_seq_len")
            or DEFAULT_MAX_POSITION_EMBEDDINGS,
            rms_norm_eps=params["norm_eps"],
            rope_parameters={"rope_type": "default", "rope_theta": float(params["rope_theta"])},
            sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    except KeyError as error:
        raise CheckpointError(f"params.json: no {error.args[0]}") from None
    return LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
        projector_hidden_act="gelu", vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_seq_length=1, multimodal_projector_bias=True, tie_word_embeddings=False)


def params_from_config(config) -> dict:
    """The params.json of a LlavaConfig (for Pixtral-12B's config, the one Mistral publishes)."""
    from shared.tokenizer import IMG_BREAK_ID, IMG_END_ID

    text, vision = config.text_config, config.vision_config
    params = {
        "dim": text.hidden_size, "n_layers": text.num_hidden_layers, "head_dim": text.head_dim,
        "hidden_dim": text.intermediate_size, "n_heads": text.num_attention_heads,
        "n_kv_heads": text.num_key_value_heads, "rope_theta": text.rope_parameters["rope_theta"],
        "norm_eps": text.rms_norm_eps, "vocab_size": text.vocab_size,
    }
    if text.max_position_embeddings != DEFAULT_MAX_POSITION_EMBEDDINGS:
        params["max_position_embeddings"] = text.max_position_embeddings
    params["vision_encoder"] = {
        "hidden_size": vision.hidden_size, "num_channels": vision.num_channels, "image_size": vision.image_size,
        "patch_size": vision.patch_size, "rope_theta": vision.rope_parameters["rope_theta"],
        "intermediate_size": vision.intermediate_size, "num_hidden_layers": vision.num_hidden_layers,
        "num_attention_heads": vision.num_attention_heads, "image_token_id": config.image_token_index,
        "image_break_token_id": IMG_BREAK_ID, "image_end_token_id": IMG_END_ID,
    }
    return params
