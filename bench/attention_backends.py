"""Which SDPA backend to use where: flash vs cuDNN vs memory-efficient, for the shapes the service runs.

    python -m bench.attention_backends      # results in $OUT/attention_backends.json

Shapes: the vision tower's attention for one 1024x1024 image ([1, 16, 4096, 64], no mask) and for 16 images of
512x512 ([16, 16, 1024, 64]); the decoder's prefill of a 4,183-token prompt ([1, 32, 4183, 128], causal, 8 KV heads).
Also the whole vision tower on a 1024x1024 image under each backend.
"""

from __future__ import annotations

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
