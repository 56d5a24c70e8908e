"""`pixtral-make-tiny DIR [--seed S] [--shards N] [--format hf|mistral] [--fp8]`: a tiny random Pixtral checkpoint.

In the Hugging Face layout (default): same key names and config structure as mistral-community/pixtral-12b and the
real 131072-token vocabulary, so the real tokenizer and the real loading code run on it; only the widths and depths
are small. `--format mistral`: the same weights in Mistral's own layout (params.json, consolidated.safetensors,
tekken.json), as mistralai/Pixtral-12B-2409 is published. `--fp8`: the language model's projections quantized to
FP8 as compressed-tensors stores them (pixtral-12b-FP8-dynamic). `--model tiny` makes one once in a cache folder
and loads it like any other checkpoint.
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

from shared import mistral_layout
from shared.checkpoint import INDEX_FILE, SINGLE_FILE
from shared.fp8_scheme import is_quantizable

DEFAULT_SEED = 0
FP8_MAX = 448.0   # the largest float8_e4m3fn
# Modules an FP8 checkpoint leaves unquantized (compressed-tensors' ignore list, in the checkpoint's names).
FP8_IGNORE = ("re:.*lm_head", "re:vision_tower.*", "re:multi_modal_projector.*")


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


def tiny_tensors(config, seed: int) -> dict[str, torch.Tensor]:
    """The weights of the tiny model of `seed` (float32), by their names in the Hugging Face files."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return {_on_disk_name(name): tensor.contiguous() for name, tensor in model.state_dict().items()}


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (float8_e4m3fn [out, in], float32 scale [out, 1]): per output channel, scale = amax / 448, so the
    largest element of each row becomes +-448 (a row of zeros gets scale 1)."""
    amax = weight.abs().amax(dim=1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_quantization_config() -> dict:
    """config.json's quantization_config of an FP8-dynamic checkpoint, as compressed-tensors writes it: 8-bit float
    weights per channel (static), 8-bit float activations per token (dynamic); the LM head, the vision tower and the
    projector left out."""
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    return QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])},
        format=CompressionFormat.float_quantized.value, quantization_status=QuantizationStatus.COMPRESSED,
        ignore=list(FP8_IGNORE)).to_dict()


def _quantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(".weight") and is_quantizable(name.removesuffix(".weight")):
            out[name], out[name + "_scale"] = quantize_fp8(tensor)
        else:
            out[name] = tensor
    return out


def _in_mistral_layout(tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in tensors.items():
        num_heads = mistral_layout.num_rope_heads(name, config)
        out[mistral_layout.mistral_name(name)] = (mistral_layout.to_interleaved(tensor, num_heads) if num_heads
                                                  else tensor)
    return out


def make_tiny(out_dir: Path, seed: int = DEFAULT_SEED, num_shards: int = 1, layout: str = "hf",
              is_fp8: bool = False) -> Path:
    """The tiny model of `seed` in `layout` ("hf" or "mistral": the same weights either way), its language model's
    projections quantized to FP8 (compressed-tensors, Hugging Face layout only) if `is_fp8`."""
    if layout not in ("hf", "mistral"):
        raise ValueError(f"layout must be hf or mistral, not {layout!r}")
    if is_fp8 and layout != "hf":
        raise ValueError("FP8 checkpoints are written in the Hugging Face layout only")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    tensors = tiny_tensors(config, seed)
    if layout == "mistral":
        from shared.tokenizer import CHECKPOINT_TOKENIZER, TOKENIZER_FILE

        (out_dir / mistral_layout.PARAMS_FILE).write_text(
            json.dumps(mistral_layout.params_from_config(config), indent=2) + "\n")
        shutil.copyfile(TOKENIZER_FILE, out_dir / CHECKPOINT_TOKENIZER)
        _save(out_dir, _in_mistral_layout(tensors, config), num_shards, mistral_layout.SINGLE_FILE,
              "consolidated-{:05d}-of-{:05d}.safetensors", mistral_layout.INDEX_FILE)
        return out_dir
    config.save_pretrained(str(out_dir))
    if is_fp8:
        path = out_dir / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "quantization_config": fp8_quantization_config()},
                                   indent=2, sort_keys=True) + "\n")
        tensors = _quantized(tensors)
    _save(out_dir, tensors, num_shards, SINGLE_FILE, "model-{:05d}-of-{:05d}.safetensors", INDEX_FILE)
    return out_dir


def _save(out_dir: Path, tensors: dict[str, torch.Tensor], num_shards: int, single_file: str, shard_file: str,
          index_file: str) -> None:
    """One file, or `num_shards` and an index of which holds what."""
    if num_shards <= 1:
        save_file(tensors, str(out_dir / single_file), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for shard in range(num_shards):
        file = shard_file.format(shard + 1, num_shards)
        part = {name: tensors[name] for name in names[shard::num_shards]}
        save_file(part, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out_dir / index_file).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True))


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
    parser.add_argument("--format", choices=("hf", "mistral"), default="hf",
                        help="hf: Hugging Face layout (config.json); mistral: Mistral's (params.json, tekken.json)")
    parser.add_argument("--fp8", action="store_true",
                        help="quantize the language model's projections to FP8 (compressed-tensors, hf layout)")
    args = parser.parse_args(argv)
    if args.fp8 and args.format != "hf":
        parser.error("--fp8 writes the Hugging Face layout only")
    print(make_tiny(args.dir, args.seed, args.shards, args.format, args.fp8))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
