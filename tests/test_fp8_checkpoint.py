"""Pre-quantized FP8 checkpoints in the compressed-tensors layout (as pixtral-12b-FP8-dynamic): the config is read by
compressed-tensors, the float8 weights and their scales come as stored, what is not served is refused by name, and
the decoder's fingerprint tells an FP8 checkpoint from its bf16 twin."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
from safetensors.torch import load_file, save_file

from services.vision.encoder import load_vision_encoder
from shared import checkpoint
from shared.fingerprints import decoder_fingerprint, vision_fingerprint
from shared.fp8_scheme import Fp8Scheme, is_quantizable
from shared.tiny import FP8_IGNORE, make_tiny
from tests.support import ROOT, child_env

CPU = torch.device("cpu")
SEED = 0
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> Path:
    """Through the console script, as users make one (python -m when it is not on PATH)."""
    directory = tmp_path_factory.mktemp("fp8") / "model"
    script = Path(sys.executable).parent / "pixtral-make-tiny"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "shared.tiny"]
    subprocess.run([*command, str(directory), "--seed", str(SEED), "--fp8"], check=True, cwd=ROOT, env=child_env(),
                   stdout=subprocess.DEVNULL)
    return directory


@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory) -> Path:
    """The same tiny model unquantized."""
    return make_tiny(tmp_path_factory.mktemp("fp8") / "twin", seed=SEED)


def raw_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())["quantization_config"]


# -- the config ----------------------------------------------------------------------------------------------------

def test_the_quantization_config_is_compressed_tensors_fp8_dynamic(fp8_dir, twin_dir):
    parsed = QuantizationConfig.model_validate(raw_config(fp8_dir))
    assert parsed.config_groups == {"group_0": preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])}
    assert (parsed.format, parsed.quant_method, parsed.ignore) == ("float-quantized", "compressed-tensors",
                                                                   list(FP8_IGNORE))
    scheme = checkpoint.quantization(fp8_dir)
    assert scheme == Fp8Scheme(weight_strategy="channel", activation_strategy="token", is_activation_dynamic=True,
                               ignored=FP8_IGNORE)
    assert scheme.is_ignored("language_model.lm_head")
    assert scheme.is_ignored("vision_tower.transformer.layers.0.attention.q_proj")
    assert scheme.is_ignored("multi_modal_projector.linear_1")
    assert not scheme.is_ignored("language_model.model.layers.1.self_attn.q_proj")
    assert checkpoint.quantization(twin_dir) is None


def test_a_preset_group_and_weight_only_fp8_are_read_too(tmp_path):
    # A config group may name a preset (compressed-tensors expands it); activations may be left unquantized.
    write_config(tmp_path, {"quant_method": "compressed-tensors", "format": "float-quantized",
                            "config_groups": {"FP8_DYNAMIC": ["Linear"]}, "ignore": ["language_model.lm_head"]})
    assert checkpoint.quantization(tmp_path) == Fp8Scheme("channel", "token", True, ("language_model.lm_head",))
    raw = copy.deepcopy(BASE)
    raw["config_groups"]["group_0"]["input_activations"] = None
    raw["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
    write_config(tmp_path, raw)
    assert checkpoint.quantization(tmp_path) == Fp8Scheme("tensor", None, False, FP8_IGNORE)


# -- the tensors -------------------------------------------------------------------------------------------------

def test_the_fp8_checkpoint_loads_float8_weights_with_their_scales(fp8_dir, twin_dir):
    text = checkpoint.read_tensors(fp8_dir, checkpoint.part_renamer("language_model"), torch.bfloat16)
    twin = checkpoint.read_tensors(twin_dir, checkpoint.part_renamer("language_model"), torch.bfloat16)
    quantized = {f"layers.{i}.{p}.weight" for i in range(2) for p in PROJECTIONS}
    assert set(text) == set(twin) | {name + "_scale" for name in quantized}
    for name in quantized:
        assert text[name].dtype == torch.float8_e4m3fn and text[name].shape == twin[name].shape
        scale = text[name + "_scale"]
        assert scale.dtype == torch.float32 and scale.shape == (twin[name].shape[0],)
    for name in set(twin) - quantized:   # embeddings, norms, LM head: unquantized, in the dtype asked for
        assert torch.equal(text[name], twin[name]), name
    for part in ("projector", "vision_tower"):
        rename = checkpoint.part_renamer(part)
        got, expected = (checkpoint.read_tensors(d, rename, torch.float32) for d in (fp8_dir, twin_dir))
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert not any(is_quantizable(name.removesuffix(".weight")) for name in checkpoint.tensor_files(twin_dir)
                   if name.startswith(("vision_tower.", "multi_modal_projector.", "language_model.lm_head")))


def test_the_vision_tower_of_an_fp8_checkpoint_encodes_as_its_twin(fp8_dir, twin_dir):
    image = torch.linspace(-1, 1, 3 * 32 * 48).reshape(3, 32, 48).numpy()
    (got,), (expected,) = (load_vision_encoder(d, CPU, torch.float32).encode([image]) for d in (fp8_dir, twin_dir))
    assert torch.equal(got, expected)


E4M3_HALF_SUBNORMAL_STEP = 2.0 ** -10   # rounding of the scaled values below 2^-6
E4M3_HALF_ULP = 2.0 ** -4               # relative rounding of the scaled values above


def within_e4m3_rounding(dequantized: torch.Tensor, original: torch.Tensor, scale: torch.Tensor) -> bool:
    """Every element within round-to-nearest e4m3 of the original: |error| <= max(|w| / 16, scale / 1024) (the half
    step of the row's scale), with float32's own rounding as the only slack."""
    bound = torch.maximum(original.abs() * E4M3_HALF_ULP, scale[:, None] * E4M3_HALF_SUBNORMAL_STEP)
    return bool(((dequantized - original).abs() <= bound * (1 + 1e-5) + 1e-12).all())


def test_dequantized_weights_are_within_e4m3_rounding_of_the_originals(fp8_dir, twin_dir):
    text = checkpoint.read_tensors(fp8_dir, checkpoint.part_renamer("language_model"), torch.float32)
    twin = checkpoint.read_tensors(twin_dir, checkpoint.part_renamer("language_model"), torch.float32)
    num_checked = 0
    for name in (f"layers.{i}.{p}.weight" for i in range(2) for p in PROJECTIONS):
        weight, scale, original = text[name].float(), text[name + "_scale"], twin[name]
        assert within_e4m3_rounding(weight * scale[:, None], original, scale), name
        # scale = amax / 448: each row's largest element is +-448 once scaled.
        assert torch.equal(weight.abs().amax(dim=1), torch.full_like(scale, 448.0)), name
        assert torch.allclose(scale, original.abs().amax(dim=1) / 448, rtol=1e-6, atol=0)
        # The bound is tight enough to see a wrong scale, a transposed one or a missing one.
        assert not within_e4m3_rounding(weight * (2 * scale)[:, None], original, scale)
        assert not within_e4m3_rounding(weight * (scale * 1.1)[:, None], original, scale)
        assert not within_e4m3_rounding(weight, original, scale)
        if weight.shape[0] == weight.shape[1]:
            assert not within_e4m3_rounding(weight * scale[None, :], original, scale)
        num_checked += 1
    assert num_checked == 14


def test_a_per_tensor_scale_comes_as_one_scale_per_row(fp8_dir, twin_dir, tmp_path):
    model_dir = tmp_path / "per-tensor"
    shutil.copytree(fp8_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
    (model_dir / "config.json").write_text(json.dumps(config))
    tensors, originals = load_file(model_dir / checkpoint.SINGLE_FILE), load_file(twin_dir / checkpoint.SINGLE_FILE)
    for name in [name for name in tensors if name.endswith("_scale")]:
        original = originals[name.removesuffix("_scale")]
        scale = original.abs().amax() / 448
        tensors[name.removesuffix("_scale")] = (original / scale).to(torch.float8_e4m3fn)
        tensors[name] = scale.reshape(1)
    save_file(tensors, model_dir / checkpoint.SINGLE_FILE)
    text = checkpoint.read_tensors(model_dir, checkpoint.part_renamer("language_model"), torch.float32)
    twin = checkpoint.read_tensors(twin_dir, checkpoint.part_renamer("language_model"), torch.float32)
    name = "layers.1.mlp.down_proj.weight"
    scale = text[name + "_scale"]
    assert scale.shape == (twin[name].shape[0],) and bool((scale == scale[0]).all())
    assert within_e4m3_rounding(text[name].float() * scale[:, None], twin[name], scale)


# -- refusals ----------------------------------------------------------------------------------------------------

BASE = json.loads(json.dumps(QuantizationConfig(
    config_groups={"group_0": preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])}, format="float-quantized",
    quantization_status="compressed", ignore=list(FP8_IGNORE)).to_dict()))


def write_config(directory: Path, quantization_config: dict) -> None:
    (directory / "config.json").write_text(json.dumps({"quantization_config": quantization_config}))


def edited(**changes):
    """BASE with `changes`: dotted paths ("config_groups.group_0.weights.strategy") -> values."""
    raw = copy.deepcopy(BASE)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node[key]
        node[last] = value
    return raw


WEIGHTS = "config_groups.group_0.weights"
ACTIVATIONS = "config_groups.group_0.input_activations"


@pytest.mark.parametrize("raw, field", [
    (edited(quant_method="fp8"), "quantization_config.quant_method"),
    (edited(quant_method="bitsandbytes"), "quantization_config.quant_method"),
    (edited(format="pack-quantized"), "quantization_config.format"),
    (edited(format="int-quantized"), "quantization_config.format"),
    (edited(**{f"{WEIGHTS}.strategy": "block", f"{WEIGHTS}.block_structure": [128, 128]}), f"{WEIGHTS}.strategy"),
    (edited(**{f"{WEIGHTS}.strategy": "group", f"{WEIGHTS}.group_size": 128}), f"{WEIGHTS}.strategy"),
    (edited(**{f"{ACTIVATIONS}.strategy": "group", f"{ACTIVATIONS}.group_size": 128}), f"{ACTIVATIONS}.strategy"),
    (edited(**{f"{ACTIVATIONS}.dynamic": False, f"{ACTIVATIONS}.strategy": "tensor"}), f"{ACTIVATIONS}.dynamic"),
    (edited(**{f"{WEIGHTS}.type": "int"}), f"{WEIGHTS}.type"),
    (edited(**{f"{WEIGHTS}.num_bits": 4, f"{WEIGHTS}.type": "int"}), f"{WEIGHTS}.type"),
    (edited(**{f"{WEIGHTS}.symmetric": False}), f"{WEIGHTS}.symmetric"),
    (edited(**{f"{WEIGHTS}.dynamic": True, f"{WEIGHTS}.strategy": "tensor"}), f"{WEIGHTS}.dynamic"),
    (edited(**{f"{WEIGHTS}.dynamic": True}), "not a compressed-tensors config (config_groups.group_0.weights: "),
    (edited(**{"config_groups.group_0.output_activations": BASE["config_groups"]["group_0"]["input_activations"]}),
     "config_groups.group_0.output_activations"),
    (edited(kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}),
     "quantization_config.kv_cache_scheme"),
    (edited(sparsity_config={"format": "sparse-24-bitmask"}), "quantization_config.sparsity_config"),
    (edited(**{f"{WEIGHTS}.strategy": "diagonal"}), "not a compressed-tensors config (config_groups.group_0.weights"
                                                      ".strategy: "),
], ids=["fp8 method", "other method", "pack-quantized", "int-quantized", "block weights", "group weights",
        "group activations", "static activations", "int8 weights", "int4 weights", "asymmetric", "dynamic weights",
        "dynamic channel weights",
        "output activations", "kv cache", "sparsity", "invalid strategy"])
def test_unsupported_quantization_is_refused_naming_the_field(tmp_path, raw, field):
    write_config(tmp_path, raw)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(field)):
        checkpoint.quantization(tmp_path)


def test_groups_of_different_schemes_are_refused(tmp_path):
    raw = copy.deepcopy(BASE)
    other = copy.deepcopy(raw["config_groups"]["group_0"])
    other["weights"]["strategy"], other["targets"] = "tensor", ["re:.*down_proj"]
    raw["config_groups"]["group_1"] = other
    write_config(tmp_path, raw)
    with pytest.raises(checkpoint.CheckpointError, match="config_groups: groups of different schemes"):
        checkpoint.quantization(tmp_path)


def rewritten(source: Path, target: Path, edit) -> Path:
    """A copy of `source` whose tensors `edit` changes in place."""
    shutil.copytree(source, target)
    tensors = load_file(target / checkpoint.SINGLE_FILE)
    edit(tensors)
    save_file(tensors, target / checkpoint.SINGLE_FILE)
    return target


Q_PROJ = "language_model.model.layers.0.self_attn.q_proj.weight"


def test_tensors_that_disagree_with_the_scheme_are_refused_by_name(fp8_dir, twin_dir, tmp_path):
    rename = checkpoint.part_renamer("language_model")
    missing = rewritten(fp8_dir, tmp_path / "missing", lambda t: t.pop(Q_PROJ + "_scale"))
    with pytest.raises(checkpoint.CheckpointError, match="q_proj.weight: float8 weight without its weight_scale"):
        checkpoint.read_tensors(missing, rename, torch.float32)

    def wrong_shape(tensors):
        tensors[Q_PROJ + "_scale"] = tensors[Q_PROJ + "_scale"][:5]
    short = rewritten(fp8_dir, tmp_path / "short", wrong_shape)
    with pytest.raises(checkpoint.CheckpointError, match=r"q_proj.weight_scale: shape \[5, 1\]"):
        checkpoint.read_tensors(short, rename, torch.float32)

    def quantize_vision(tensors):
        name = "vision_tower.transformer.layers.0.attention.q_proj.weight"
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    vision = rewritten(fp8_dir, tmp_path / "vision", quantize_vision)
    with pytest.raises(checkpoint.CheckpointError, match="vision_tower.transformer.layers.0.attention.q_proj.weight"
                                                         ": quantized, but only the language model's projections"):
        checkpoint.read_tensors(vision, checkpoint.part_renamer("vision_tower"), torch.float32)

    def quantize_without_config(tensors):
        tensors[Q_PROJ] = tensors[Q_PROJ].to(torch.float8_e4m3fn)
    unconfigured = rewritten(twin_dir, tmp_path / "unconfigured", quantize_without_config)
    with pytest.raises(checkpoint.CheckpointError, match="float8 tensor in a checkpoint without a quantization"):
        checkpoint.read_tensors(unconfigured, rename, torch.float32)

    raw = copy.deepcopy(BASE)
    raw["ignore"] = [*FP8_IGNORE, "re:.*layers\\.0\\.self_attn\\.q_proj$"]
    ignoring = tmp_path / "ignoring"
    shutil.copytree(fp8_dir, ignoring)
    config = json.loads((ignoring / "config.json").read_text())
    (ignoring / "config.json").write_text(json.dumps({**config, "quantization_config": raw}))
    with pytest.raises(checkpoint.CheckpointError, match="the quantization_config ignores"):
        checkpoint.read_tensors(ignoring, rename, torch.float32)


def test_fp8_is_written_in_the_hf_layout_only(tmp_path):
    result = subprocess.run([sys.executable, "-m", "shared.tiny", str(tmp_path / "x"), "--fp8", "--format", "mistral"],
                            cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert result.returncode == 2 and "--fp8 writes the Hugging Face layout only" in result.stderr


# -- fingerprints ------------------------------------------------------------------------------------------------

def test_the_decoder_fingerprint_tells_fp8_from_bf16_and_the_vision_one_does_not(fp8_dir, twin_dir, tmp_path):
    assert vision_fingerprint(fp8_dir) == vision_fingerprint(twin_dir)
    fingerprints = {decoder_fingerprint(fp8_dir), decoder_fingerprint(twin_dir),
                    decoder_fingerprint(twin_dir, load_quantization="fp8")}
    assert len(fingerprints) == 3
    assert decoder_fingerprint(twin_dir) == decoder_fingerprint(twin_dir)

    def rescale(tensors):   # same float8 bits, another scale: other weights
        tensors[Q_PROJ + "_scale"] = tensors[Q_PROJ + "_scale"] * 2
    assert decoder_fingerprint(rewritten(fp8_dir, tmp_path / "rescaled", rescale)) not in fingerprints
