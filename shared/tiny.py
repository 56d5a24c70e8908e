"""`pixtral-make-tiny DIR [--seed S] [--shards N]`: a tiny random Pixtral checkpoint in the Hugging Face layout.

Same key names and config structure as mistral-community/pixtral-12b and the real 131072-token vocabulary, so
the real tokenizer and the real loading code run on it; only the widths and depths are small. `--model tiny`
makes one once in a cache folder and loads it like any other checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from shared.checkpoint import INDEX_FILE, SINGLE_FILE

DEFAULT_SEED = 0


def tiny_config():
    from transformers import LlavaConfig, MistralConfig, PixtralVisionConfig

    vision = PixtralVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_channels=3,
        image_size=1024, patch_size=16, hidden_act="silu", rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    text = MistralConfig(
        vocab_size=131072, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e9}, sliding_window=None, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=11)
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=10, projector_hidden_act="gelu",
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_seq_length=1,
        multimodal_projector_bias=True, tie_word_embeddings=False)


def pixtral_12b_config():
    """The full Pixtral-12B shape (for benchmarks with random weights)."""
    from transformers import LlavaConfig, MistralConfig, PixtralVisionConfig

    vision = PixtralVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, num_channels=3,
        image_size=1024, patch_size=16, hidden_act="silu", rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    text = MistralConfig(
        vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=1024000, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e9}, sliding_window=None, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=10, projector_hidden_act="gelu",
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_seq_length=1,
        multimodal_projector_bias=True, tie_word_embeddings=False)


def _on_disk_name(name: str) -> str:
    """transformers' in-memory Llava names -> the names in mistral-community/pixtral-12b's files."""
    if name.startswith("model.language_model."):
        return "language_model.model." + name.removeprefix("model.language_model.")
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    return name.removeprefix("model.")


def make_tiny(out_dir: Path, seed: int = DEFAULT_SEED, num_shards: int = 1) -> Path:
    from transformers import LlavaForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    tensors = {_on_disk_name(name): tensor.contiguous() for name, tensor in model.state_dict().items()}
    config.save_pretrained(str(out_dir))
    names = sorted(tensors)
    if num_shards <= 1:
        save_file(tensors, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
        return out_dir
    weight_map = {}
    for shard in range(num_shards):
        file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::num_shards]}
        save_file(part, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True))
    return out_dir


def cache_dir() -> Path:
    root = os.environ.get("PIXTRAL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pixtral")
    return Path(root)


def ensure_tiny(seed: int = DEFAULT_SEED) -> Path:
    """The cached tiny checkpoint for `seed`, made on first use (atomically: concurrent callers are safe)."""
    target = cache_dir() / f"tiny-seed{seed}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        make_tiny(staging, seed)
        try:
            staging.rename(target)
        except OSError:  # another process won the race
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(spec: str) -> Path:
    """`tiny` -> the cached tiny checkpoint; anything else is a checkpoint directory."""
    return ensure_tiny() if spec == "tiny" else Path(spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixtral-make-tiny", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed of the weights")
    parser.add_argument("--shards", type=int, default=1, help="write N shards and an index")
    args = parser.parse_args(argv)
    print(make_tiny(args.dir, args.seed, args.shards))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
