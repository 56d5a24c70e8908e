"""Helpers shared by the benchmarks: timing, prompts, results."""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

OUT = Path(os.environ.get("OUT", "bench-results"))

# ~32 text tokens
QUESTION = "Describe everything you can see in this picture, including colours, shapes, textures and any text."


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of `fn()` (synchronized)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of `values` by rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def noise_png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def image_prompt(width: int, height: int, seed: int, text: str = QUESTION):
    """(token ids, [(3, H, W) float32 pixels]) of one user turn: an image then text, via mistral-common."""
    # Imported here: benchmarks that make no prompts run where mistral-common is not installed.
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    from shared.tokenizer import load_tokenizer
    image = Image.open(io.BytesIO(noise_png(width, height, seed)))
    encoded = load_tokenizer().encode_chat_completion(ChatCompletionRequest(messages=[
        UserMessage(content=[ImageChunk(image=image), TextChunk(text=text)])]))
    return list(encoded.tokens), list(encoded.images)


def save(name: str, results: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(f"== {name}", file=sys.stderr)
    for key, value in results.items():
        print(f"{key:>48}  {value:.4g}" if isinstance(value, float) else f"{key:>48}  {value}", file=sys.stderr)


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
