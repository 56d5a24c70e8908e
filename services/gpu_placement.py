"""Where pixtral-serve puts its model processes on a machine with GPUs: one decoder per GPU while there are GPUs
enough (decoders sharing one split its memory), vision workers beside the decoders or on GPUs of their own.

Each child sees only its GPU (CUDA_VISIBLE_DEVICES), so every role still addresses `cuda:0`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass

# Of a GPU's memory, what its decoders' --gpu-memory-utilization add up to: the rest is for vision workers on it,
# the CUDA contexts and the allocator's slack.
DECODERS_SHARE = 0.85
VISION_PLACEMENTS = ("shared", "own")


@dataclass(frozen=True, slots=True)
class Placement:
    decoders: tuple[tuple[str, float], ...]   # per decoder: its GPU and its --gpu-memory-utilization
    vision: tuple[str, ...]                   # per vision worker: its GPU


def visible_gpus(requested: str = "") -> list[str]:
    """The GPUs to place on, as CUDA_VISIBLE_DEVICES names them: `requested` (comma-separated), else those
    CUDA_VISIBLE_DEVICES lists, else every GPU nvidia-smi sees; [] when none is found."""
    listed = requested or os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        lines = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(index) for index, line in enumerate(lines.splitlines()) if line.startswith("GPU ")]


def place(gpus: list[str], num_decoders: int, num_vision: int, vision: str = "shared") -> Placement:
    """Decoder i on gpus[i % len(gpus)], sharing DECODERS_SHARE of it with the other decoders there; vision
    workers in turn over the decoders' GPUs ("shared") or over the GPUs left without a decoder ("own")."""
    if not gpus:
        raise ValueError("no GPU to place the roles on (--gpus, CUDA_VISIBLE_DEVICES or nvidia-smi)")
    if vision not in VISION_PLACEMENTS:
        raise ValueError(f"--vision-gpus must be one of {', '.join(VISION_PLACEMENTS)}, got {vision!r}")
    decoder_gpus = [gpus[index % len(gpus)] for index in range(num_decoders)]
    per_gpu = Counter(decoder_gpus)
    if vision == "own":
        free = [gpu for gpu in gpus if gpu not in per_gpu]
        if not free:
            raise ValueError(f"--vision-gpus own needs a GPU without a decoder: {num_decoders} decoders take all "
                             f"{len(gpus)} GPUs")
        vision_gpus = free
    else:
        vision_gpus = list(dict.fromkeys(decoder_gpus))
    return Placement(tuple((gpu, round(DECODERS_SHARE / per_gpu[gpu], 3)) for gpu in decoder_gpus),
                     tuple(vision_gpus[index % len(vision_gpus)] for index in range(num_vision)))
