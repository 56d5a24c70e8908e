"""Reading a Pixtral checkpoint directory: config, partial tensor loads, quantization (model fingerprints:
shared/fingerprints.py).

Two layouts, told apart by their files:
- Hugging Face: `config.json` (LlavaConfig) and either `model.safetensors` or shards listed by
  `model.safetensors.index.json`. Key names follow mistral-community/pixtral-12b (`vision_tower.*`,
  `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`); the names transformers uses in
  memory (`model.vision_tower.*`, `model.language_model.*`, `lm_head.*`) are accepted too. A `quantization_config`
  in config.json makes it a pre-quantized FP8 checkpoint (compressed-tensors: shared/fp8_scheme.py).
- Mistral's own: `params.json`, `consolidated*.safetensors`, `tekken.json` (shared/mistral_layout.py). Its config
  and tensors are read as those of the same model converted to the Hugging Face layout: same config, same names,
  same values (q/k rows reordered as the conversion does), so every role reads either without knowing which.

Each role reads only its own tensors: `read_tensors` opens a tensor only if `rename` maps its name, so the other
role's weights are never materialized.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import LlavaConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# A directory with config.json and this file instead of weights: random weights of the config's shape, made on
# the device at load (benchmarks of the full Pixtral-12B shape without a 25 GB download: same compute).
RANDOM_WEIGHTS_FILE = "random_weights.json"

# Pixtral-12B was trained with a 128K context; its config's max_position_embeddings (1,024,000) is the size of its
# RoPE table, not a context it serves.
TRAINED_CONTEXT = 131072


_RULES: dict[str, list[tuple[re.Pattern, str]]] = {
    "vision_tower": [(re.compile(r"^(model\.)?vision_tower\."), "")],
    "projector": [(re.compile(r"^(model\.)?multi_modal_projector\."), "")],
    "language_model": [(re.compile(r"^(language_model\.model\.|model\.language_model\.)"), ""),
                       (re.compile(r"^(language_model\.)?lm_head\."), "lm_head.")],
}


class CheckpointError(ValueError):
    """The directory is not a Pixtral checkpoint this service can serve."""


@dataclass(frozen=True, slots=True)
class TensorSource:
    file: Path
    key: str                 # its name in the file
    num_rope_heads: int = 0  # > 0: Mistral's wq/wk of that many heads, rows reordered at read (mistral_layout)


def part_renamer(part: str) -> Callable[[str], str | None]:
    """Maps a checkpoint key of `part` to its name inside that part's module, or None for other keys."""
    rules = _RULES[part]

    def rename(key: str) -> str | None:
        for pattern, replacement in rules:
            if pattern.match(key):
                return pattern.sub(replacement, key, count=1)
        return None
    return rename


def is_mistral_layout(model_dir: Path) -> bool:
    return mistral_layout.is_mistral_layout(model_dir)


def load_config(model_dir: Path) -> LlavaConfig:
    if is_mistral_layout(model_dir):
        return mistral_layout.load_config(model_dir)
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json (nor Mistral's params.json)")
    raw = json.loads(path.read_text())
    config = LlavaConfig.from_pretrained(str(model_dir))
    # The published Pixtral config once lacked the vision activation; the class default (gelu) is wrong for
    # Pixtral, whose vision FFN is SwiGLU.
    if "hidden_act" not in raw.get("vision_config", {}):
        config.vision_config.hidden_act = "silu"
    if config.vision_feature_layer != -1 or config.vision_feature_select_strategy != "full":
        raise CheckpointError("only vision_feature_layer=-1 with vision_feature_select_strategy='full' "
                              "(Pixtral) is supported")
    if getattr(config, "spatial_merge_size", 1) not in (1, None):
        raise CheckpointError("spatial merge (Mistral-Small-3.1) is not supported")
    return config


def context_length(config: LlavaConfig) -> int:
    """Prompt + generated tokens the model serves: its positions, at most the trained context."""
    return min(config.text_config.max_position_embeddings, TRAINED_CONTEXT)


def quantization(model_dir: Path):
    """The FP8 scheme of a pre-quantized checkpoint (shared.fp8_scheme.Fp8Scheme), None for an unquantized one;
    CheckpointError for a quantization this service does not serve."""
    if is_mistral_layout(model_dir):
        return None   # mistral_layout.load_config refuses Mistral's own quantized layout
    path = Path(model_dir) / "config.json"
    raw = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    return fp8_scheme.parse(raw) if raw else None


def random_weights_seed(model_dir: Path) -> int | None:
    """The seed of a random-weights directory, None for a real checkpoint."""
    marker = Path(model_dir) / RANDOM_WEIGHTS_FILE
    return int(json.loads(marker.read_text())["seed"]) if marker.is_file() else None


def tensor_sources(model_dir: Path) -> dict[str, TensorSource]:
    """Tensor name (as in the Hugging Face files) -> where and how to read it, in either layout."""
    model_dir = Path(model_dir)
    if is_mistral_layout(model_dir):
        config = load_config(model_dir)
        return {name: TensorSource(file, key, mistral_layout.num_rope_heads(name, config))
                for name, (file, key) in mistral_layout.tensor_keys(model_dir).items()}
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: TensorSource(model_dir / file, name) for name, file in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return {name: TensorSource(single, name) for name in safetensors_keys(single)}
    raise CheckpointError(f"{model_dir}: neither {INDEX_FILE} nor {SINGLE_FILE}")


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name (as in the Hugging Face files) -> the safetensors file that holds it."""
    return {name: source.file for name, source in tensor_sources(model_dir).items()}


def read_tensors(model_dir: Path, rename: Callable[[str], str | None], dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Reads only the tensors `rename` maps (to their new names) onto `device`, converted to `dtype`; in an FP8
    checkpoint the float8 weights stay as stored (float8_e4m3fn [out, in]) and their scales come under
    `<new name>_scale` (`...weight_scale`), float32 [out]: one per output row, also for a per-tensor scale."""
    scheme = quantization(model_dir)
    by_file: dict[Path, list[tuple[str, TensorSource, str]]] = {}
    for name, source in tensor_sources(model_dir).items():
        new_name = rename(name)
        if new_name is not None:
            by_file.setdefault(source.file, []).append((name, source, new_name))
    tensors = {}
    for file, entries in sorted(by_file.items()):
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for name, source, new_name in entries:
                tensor = reader.get_tensor(source.key)
                if source.num_rope_heads:
                    tensor = mistral_layout.to_rotate_half(tensor, source.num_rope_heads)
                tensors[new_name] = _converted(name, tensor, scheme, dtype, device)
    if not tensors:
        raise CheckpointError(f"{model_dir}: no tensors for this role")
    if scheme is not None:
        fp8_scheme.attach_scales(tensors, scheme)
    return tensors


def _converted(name: str, tensor: torch.Tensor, scheme, dtype: torch.dtype, device) -> torch.Tensor:
    if tensor.dtype == torch.float8_e4m3fn:
        fp8_scheme.check_quantized(name, scheme)
        return tensor.to(device=device)
    if name.endswith(".weight_scale") and scheme is not None:
        return tensor.to(device=device, dtype=torch.float32)
    if not tensor.dtype.is_floating_point or tensor.dtype.itemsize < 2 or name.endswith("_scale"):
        raise CheckpointError(f"{name}: a {tensor.dtype} tensor is not supported here")
    return tensor.to(device=device, dtype=dtype)


def safetensors_keys(file: Path) -> list[str]:
    return list(safetensors_header(file)[1])


def safetensors_header(file: Path) -> tuple[int, dict]:
    """(offset of the data, tensor entries) of a safetensors file."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header



# Below the definitions they use (CheckpointError, safetensors_keys): each imports this module.
from shared import fp8_scheme, mistral_layout  # noqa: E402
