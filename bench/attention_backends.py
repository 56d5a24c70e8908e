"""Which SDPA backend to use where: flash vs cuDNN vs memory-efficient, for the shapes the service runs.

    python -m bench.attention_backends      # results in $OUT/attention_backends.json

Shapes: the vision tower's attention for one 1024x1024 image ([1, 16, 4096, 64], no mask) and for 16 images of
512x512 ([16, 16, 1024, 64]); the decoder's prefill of a 4,183-token prompt ([1, 32, 4183, 128], causal, 8 KV heads).
Also the whole vision tower on a 1024x1024 image under each backend, and the first call of each backend for a
sequence length it has not seen (a service sees new prompt lengths all the time): causal prefills, and a
later chunk of a prompt under a mask.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import gpu_name, save, timed
from services.vision.encoder import random_tower
from services.vision.model import VisionSpec
from shared.tiny import pixtral_12b_config

DEVICE = torch.device("cuda")
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def first_call_ms(run) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started)


@torch.inference_mode()
def new_length_figures(results: dict) -> None:
    """Median first-call time over 5 new lengths, and the steady time of the last one."""
    for backend, choice in BACKENDS.items():
        for case in ("causal", "chunk"):
            firsts = []
            try:
                for i in range(5):
                    length = 3001 + 37 * i + (0 if case == "causal" else 1000)
                    q_len = length if case == "causal" else 600
                    q = torch.randn(1, 32, q_len, 128, device=DEVICE, dtype=torch.bfloat16)
                    k, v = (torch.randn(1, 8, length, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
                    mask = None
                    if case == "chunk":
                        rows = torch.arange(length - q_len, length, device=DEVICE)
                        mask = torch.arange(length, device=DEVICE)[None, :] <= rows[:, None]
                    with sdpa_kernel([choice]):
                        run = lambda: F.scaled_dot_product_attention(  # noqa: E731
                            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
                        firsts.append(first_call_ms(run))
                        steady = 1000 * timed(run, repeats=10, warmup=2)
                results[f"new_length_{case}_{backend}_first_ms"] = statistics.median(firsts)
                results[f"new_length_{case}_{backend}_steady_ms"] = steady
            except RuntimeError as error:
                results[f"new_length_{case}_{backend}"] = f"unavailable: {str(error)[:80]}"


@torch.inference_mode()
def main() -> None:
    results = {"device": gpu_name()}
    shapes = {"vision_1024": ((1, 16, 4096, 64), (1, 16, 4096, 64), False),
              "vision_512x16": ((16, 16, 1024, 64), (16, 16, 1024, 64), False),
              "prefill_4183": ((1, 32, 4183, 128), (1, 8, 4183, 128), True)}
    for name, (q_shape, kv_shape, causal) in shapes.items():
        q = torch.randn(q_shape, device=DEVICE, dtype=torch.bfloat16)
        k, v = (torch.randn(kv_shape, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
        reference = None
        for backend, choice in BACKENDS.items():
            try:
                with sdpa_kernel([choice]):
                    run = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)  # noqa
                    out = run()
                    results[f"{name}_{backend}_ms"] = 1000 * timed(run, repeats=20, warmup=3)
                reference = out.float() if reference is None else reference
                results[f"{name}_{backend}_rel_err"] = float((out.float() - reference).norm() / reference.norm())
            except RuntimeError as error:
                results[f"{name}_{backend}"] = f"unavailable: {str(error)[:80]}"
    new_length_figures(results)
    spec = VisionSpec.from_config(pixtral_12b_config().vision_config)
    tower = random_tower(spec, torch.bfloat16, DEVICE, seed=0)
    pixels = [torch.randn(3, 1024, 1024, device=DEVICE, dtype=torch.bfloat16)]
    for backend, choice in BACKENDS.items():
        try:
            with sdpa_kernel([choice]):
                results[f"tower_1024_eager_{backend}_ms"] = 1000 * timed(lambda: tower(pixels), repeats=10, warmup=2)
        except RuntimeError as error:
            results[f"tower_1024_{backend}"] = f"unavailable: {str(error)[:80]}"
    save("attention_backends", results)


if __name__ == "__main__":
    main()
