"""Reading a Hugging Face Pixtral checkpoint directory: config, partial tensor loads, model fingerprint.

A directory holds `config.json` (LlavaConfig) and either `model.safetensors` or shards listed by
`model.safetensors.index.json`. Key names follow mistral-community/pixtral-12b (`vision_tower.*`,
`multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`); the names transformers uses in
memory (`model.vision_tower.*`, `model.language_model.*`, `lm_head.*`) are accepted too.

Each role reads only its own tensors: `read_tensors` opens a tensor only if `rename` maps its name, so the other
role's weights are never materialized.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import re
import struct
from collections.abc import Callable
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

# Bumped whenever image preprocessing changes in a way the weights do not show: it is part of the fingerprint.
PREPROCESSING_VERSION = "mistral-common-1.13.1/patch16/max1024/cubic/clip-mean-std/v1"

_RULES: dict[str, list[tuple[re.Pattern, str]]] = {
    "vision_tower": [(re.compile(r"^(model\.)?vision_tower\."), "")],
    "projector": [(re.compile(r"^(model\.)?multi_modal_projector\."), "")],
    "language_model": [(re.compile(r"^(language_model\.model\.|model\.language_model\.)"), ""),
                       (re.compile(r"^(language_model\.)?lm_head\."), "lm_head.")],
}


class CheckpointError(ValueError):
    """The directory is not a Pixtral checkpoint this service can serve."""


def part_renamer(part: str) -> Callable[[str], str | None]:
    """Maps a checkpoint key of `part` to its name inside that part's module, or None for other keys."""
    rules = _RULES[part]

    def rename(key: str) -> str | None:
        for pattern, replacement in rules:
            if pattern.match(key):
                return pattern.sub(replacement, key, count=1)
        return None
    return rename


def load_config(model_dir: Path) -> LlavaConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json")
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


def random_weights_seed(model_dir: Path) -> int | None:
    """The seed of a random-weights directory, None for a real checkpoint."""
    marker = Path(model_dir) / RANDOM_WEIGHTS_FILE
    return int(json.loads(marker.read_text())["seed"]) if marker.is_file() else None


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return {name: single for name in _header(single)}
    raise CheckpointError(f"{model_dir}: neither {INDEX_FILE} nor {SINGLE_FILE}")


def read_tensors(model_dir: Path, rename: Callable[[str], str | None], dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Reads only the tensors `rename` maps (to their new names), converted to `dtype` on `device`."""
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for key, file in tensor_files(model_dir).items():
        new_name = rename(key)
        if new_name is not None:
            by_file.setdefault(file, []).append((key, new_name))
    tensors = {}
    for file, names in sorted(by_file.items()):
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for key, new_name in names:
                tensors[new_name] = reader.get_tensor(key).to(device=device, dtype=dtype)
    if not tensors:
        raise CheckpointError(f"{model_dir}: no tensors for this role")
    return tensors


def _header(file: Path) -> dict:
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def vision_fingerprint(model_dir: Path) -> str:
    """16 hex chars naming what produces cached features: vision weights, vision config, preprocessing.

    Hashes the raw bytes of every vision-tower tensor (read from the memory-mapped files), so any change of the
    weights gives new cache keys and stale embeddings are never served.
    """
    config = load_config(model_dir)
    digest = hashlib.sha256()
    digest.update(PREPROCESSING_VERSION.encode())
    digest.update(json.dumps(config.vision_config.to_dict(), sort_keys=True, default=str).encode())
    seed = random_weights_seed(model_dir)
    if seed is not None:
        digest.update(f"random weights, seed {seed}".encode())
        return digest.hexdigest()[:16]
    rename = part_renamer("vision_tower")
    tensors = sorted((rename(key), key, file) for key, file in tensor_files(model_dir).items()
                     if rename(key) is not None)
    headers = {file: _header(file) for file in {file for _, _, file in tensors}}
    with contextlib.ExitStack() as stack:
        maps = {}
        for file in headers:
            handle = stack.enter_context(open(file, "rb"))
            maps[file] = stack.enter_context(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
        for name, key, file in tensors:  # in name order: the same bytes in any sharding give the same digest
            data, entry = maps[file], headers[file][key]
            base = 8 + struct.unpack("<Q", data[:8])[0]
            start, end = entry["data_offsets"]
            digest.update(f"{name}:{entry['dtype']}:{entry['shape']}".encode())
            digest.update(data[base + start: base + end])
    return digest.hexdigest()[:16]
