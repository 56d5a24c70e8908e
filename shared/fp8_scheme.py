"""The FP8 scheme of a pre-quantized checkpoint in the compressed-tensors layout (pixtral-12b-FP8-dynamic and the
like): config.json's `quantization_config`, read with the compressed-tensors package, and the tensors it implies.

Served: float8 e4m3 weights with static scales, a scale per output channel (or one per matrix), stored as
`<name>.weight` (float8_e4m3fn) and `<name>.weight_scale` ([out, 1]), on the language model's projections only;
input activations quantized dynamically (their scales are computed at run time, so the checkpoint holds none) or not
at all. Refused, naming the field: another method or format, block, group or other strategies, static activation
scales, integer or asymmetric quantization, a quantized KV cache, sparsity or transforms.

compressed-tensors takes seconds to import: only a checkpoint that has a quantization_config imports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from shared.checkpoint import CheckpointError

# The modules that may be quantized: the language model's attention and MLP projections (the LM head, the
# embeddings, the vision tower and the projector are served in bf16). Both spellings part_renamer reads.
_QUANTIZABLE = re.compile(r"^(language_model\.model|model\.language_model)\.layers\.\d+\."
                          r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
_WEIGHT_STRATEGIES = ("channel", "tensor")
_ACTIVATION_STRATEGIES = ("token", "tensor")


@dataclass(frozen=True, slots=True)
class Fp8Scheme:
    weight_strategy: str               # "channel": a scale per output row; "tensor": one for the whole matrix
    activation_strategy: str | None    # "token" or "tensor", quantized at run time; None: activations stay as they are
    is_activation_dynamic: bool        # scales computed at run time (always, when activations are quantized)
    ignored: tuple[str, ...]           # modules left unquantized: names or "re:" patterns, in the checkpoint's names

    def is_ignored(self, module: str) -> bool:
        from compressed_tensors.utils.match import match_name
        return any(match_name(module, target) for target in self.ignored)


def _value(field) -> str | None:
    """An enum member or its value -> the value."""
    return None if field is None else str(getattr(field, "value", field))


def parse(raw: dict) -> Fp8Scheme:
    """config.json's quantization_config -> the scheme, or CheckpointError naming what is not supported."""
    import pydantic
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig

    method = str(raw.get("quant_method", "")).lower().replace("_", "-")
    if method != "compressed-tensors":
        raise CheckpointError(f"quantization_config.quant_method: {raw.get('quant_method')!r} is not supported "
                              "(only compressed-tensors)")
    for field in ("sparsity_config", "transform_config"):
        if raw.get(field):
            raise CheckpointError(f"quantization_config.{field}: not supported")
    try:
        config = QuantizationConfig.model_validate(raw)
    except pydantic.ValidationError as error:
        raise CheckpointError(f"quantization_config: not a compressed-tensors config ({_first_error(error)})") from None
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"quantization_config: not a compressed-tensors config ({error})") from None
    if config.format != CompressionFormat.float_quantized.value:
        raise CheckpointError(f"quantization_config.format: {config.format!r} is not supported "
                              f"(only {CompressionFormat.float_quantized.value!r})")
    if config.kv_cache_scheme is not None:
        raise CheckpointError("quantization_config.kv_cache_scheme: a KV cache quantized by the checkpoint is not "
                              "supported")
    if not config.config_groups:
        raise CheckpointError("quantization_config.config_groups: empty")
    schemes = set()
    for group, scheme in config.config_groups.items():
        field = f"quantization_config.config_groups.{group}"
        if _value(scheme.format) not in (None, CompressionFormat.float_quantized.value):
            raise CheckpointError(f"{field}.format: {_value(scheme.format)!r} is not supported")
        if scheme.output_activations is not None:
            raise CheckpointError(f"{field}.output_activations: quantized outputs are not supported")
        if scheme.weights is None:
            raise CheckpointError(f"{field}.weights: none (only quantized weights are supported)")
        _check_fp8(scheme.weights, f"{field}.weights", _WEIGHT_STRATEGIES)
        if scheme.weights.dynamic:
            raise CheckpointError(f"{field}.weights.dynamic: weights quantized at run time are not supported")
        activations = scheme.input_activations
        if activations is not None:
            _check_fp8(activations, f"{field}.input_activations", _ACTIVATION_STRATEGIES)
            if activations.dynamic is not True:
                raise CheckpointError(f"{field}.input_activations.dynamic: {activations.dynamic!r}: static "
                                      "activation scales are not supported (only dynamic ones)")
        schemes.add((_value(scheme.weights.strategy), _value(activations.strategy) if activations else None))
    if len(schemes) > 1:
        raise CheckpointError("quantization_config.config_groups: groups of different schemes are not supported")
    ((weight_strategy, activation_strategy),) = schemes
    return Fp8Scheme(weight_strategy, activation_strategy, activation_strategy is not None,
                     tuple(config.ignore or ()))


def _first_error(error) -> str:
    """A pydantic validation error as `field: message`, its path without pydantic's validator and union steps."""
    details = error.errors()
    # A config group is a scheme or a preset's list of targets: the error of the scheme is the one that says why.
    detail = next((d for d in details if not any("list[" in str(step) for step in d["loc"])), details[0])
    field = ".".join(str(step) for step in detail["loc"] if "[" not in str(step))
    return f"{field}: {detail['msg']}"


def _check_fp8(args, field: str, strategies: tuple[str, ...]) -> None:
    kind = _value(args.type)
    if kind != "float" or args.num_bits != 8:
        raise CheckpointError(f"{field}.type: {args.num_bits}-bit {kind} is not supported (only 8-bit float)")
    if not args.symmetric:
        raise CheckpointError(f"{field}.symmetric: false (zero points) is not supported")
    strategy = _value(args.strategy)
    if strategy not in strategies:
        raise CheckpointError(f"{field}.strategy: {strategy!r} is not supported (only "
                              f"{' or '.join(repr(s) for s in strategies)})")


def is_quantizable(module: str) -> bool:
    """A module (by the checkpoint's name) that may hold float8 weights: a projection of the language model."""
    return _QUANTIZABLE.match(module) is not None


def check_quantized(name: str, scheme: Fp8Scheme | None) -> None:
    """A float8 tensor `name` (the checkpoint's name) may be read: a quantized projection of the scheme."""
    module = name.removesuffix(".weight")
    if scheme is None:
        raise CheckpointError(f"{name}: float8 tensor in a checkpoint without a quantization_config")
    if not name.endswith(".weight") or not is_quantizable(module):
        raise CheckpointError(f"{name}: quantized, but only the language model's projections may be")
    if scheme.is_ignored(module):
        raise CheckpointError(f"{name}: quantized, but the quantization_config ignores {module}")


def attach_scales(tensors: dict[str, torch.Tensor], scheme: Fp8Scheme) -> None:
    """Checks that every float8 weight has its scale and makes each scale float32 [out] (one per output row, also
    for a per-tensor scale), in place."""
    for name in [name for name in tensors if name.endswith(".weight_scale")]:
        weight = tensors.get(name.removesuffix("_scale"))
        if weight is None or weight.dtype != torch.float8_e4m3fn:
            raise CheckpointError(f"{name}: a scale without its float8 weight")
    for name, weight in list(tensors.items()):
        if weight.dtype != torch.float8_e4m3fn:
            continue
        scale = tensors.get(name + "_scale")
        if scale is None:
            raise CheckpointError(f"{name}: float8 weight without its weight_scale")
        num_rows = weight.shape[0]
        expected = num_rows if scheme.weight_strategy == "channel" else 1
        if scale.numel() != expected or (scale.dim() == 2 and scale.shape[1] != 1) or scale.dim() > 2:
            raise CheckpointError(f"{name}_scale: shape {list(scale.shape)} for a {scheme.weight_strategy} scale of "
                                  f"a weight of shape {list(weight.shape)}")
        tensors[name + "_scale"] = scale.to(torch.float32).reshape(-1).expand(num_rows).contiguous()
