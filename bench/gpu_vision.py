"""Vision encoder vs transformers, full Pixtral-12B vision shape, random bf16 weights, one CUDA GPU;
and the economics of the embedding cache (bytes, Redis round trips, projector and preprocessing costs).

    python -m bench.gpu_vision [--redis redis://127.0.0.1:6379/0]     # results in $OUT/vision.json

Also the time of each op of one layer at 1024x1024, each timed alone (`layer_1024_*`), after a sweep of the launch
shapes of the memory-bound Triton kernels (`kernel_sweep_*`: RMSNorm and SwiGLU at the vision tower's and the
decoder's prefill shapes, the vision RoPE); the best of each is used for the rest of the run. And the patch
embedding of a 1024x1024 image as the checkpoint's convolution and as our matmul (`patch_*`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import time

import redis
import torch
from PIL import Image

from bench.common import gpu_name, noise_png, save, timed
from services.vision.encoder import VisionEncoder
from services.vision.graphs import TowerGraphs
from services.vision.kernels import rotate_heads_
from services.vision.model import VisionSpec, VisionTower, state_from_checkpoint
from shared import sdpa
from shared.embedding_cache import decode_entry, encode_entry
from shared.images import preprocess
from shared.tiny import pixtral_12b_config

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
MIXED = [(512, 512), (1024, 768), (256, 1024), (768, 512), (1024, 1024), (384, 384), (640, 480), (1024, 256)]


def pixels_of(width: int, height: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(preprocess(noise_png(width, height, seed), 10**8)).to(DEVICE, DTYPE)


def graphed(tower: VisionTower, inputs: list[torch.Tensor]):
    """Our tower as a CUDA graph for the shapes of `inputs`, captured at once (the worker waits for a shape to
    be frequent: services/vision/graphs.py) -> replay(inputs) -> features."""
    return TowerGraphs(tower, capacity=1, after=1).capture(inputs)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def bench_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200)


SWEEPS = {
    "RMS_NORM_LAUNCH": [(1, 8), (1, 4), (2, 4), (4, 4), (4, 8), (8, 8)],
    "SILU_LAUNCH": [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8)],
    "ROTATE_LAUNCH": [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 8)],
}


@torch.inference_mode()
def kernel_sweep(results: dict) -> None:
    from shared import kernels
    from services.vision import kernels as vision_kernels
    vision = torch.randn(4096, 1024, device=DEVICE, dtype=DTYPE)
    prefill = torch.randn(8192, 5120, device=DEVICE, dtype=DTYPE)
    weights = {n: torch.ones(n, device=DEVICE, dtype=DTYPE) for n in (1024, 5120)}
    swiglu_vision = torch.randn(4096, 8192, device=DEVICE, dtype=DTYPE)
    swiglu_prefill = torch.randn(8192, 28672, device=DEVICE, dtype=DTYPE)
    qkv = torch.randn(4096, 3072, device=DEVICE, dtype=DTYPE)
    angles = torch.rand(4096, 32, device=DEVICE) * 6.28
    cos, sin = angles.cos(), angles.sin()
    cases = {
        "RMS_NORM_LAUNCH": (kernels, {
            "vision": lambda: kernels.add_rms_norm(vision, weights[1024], 1e-5, vision),
            "prefill": lambda: kernels.add_rms_norm(prefill, weights[5120], 1e-5, prefill)}),
        "SILU_LAUNCH": (kernels, {"vision": lambda: kernels.silu_and_mul(swiglu_vision),
                                  "prefill": lambda: kernels.silu_and_mul(swiglu_prefill)}),
        "ROTATE_LAUNCH": (vision_kernels, {"vision": lambda: vision_kernels.rotate_heads_(qkv, cos, sin, 32, 64)}),
    }
    for name, (module, shapes) in cases.items():
        scores = {}
        for launch in SWEEPS[name]:
            setattr(module, name, launch)
            scores[launch] = 0.0
            for shape, fn in shapes.items():
                ms = bench_ms(fn)
                results[f"kernel_sweep_{name.lower()}_{shape}_{launch[0]}x{launch[1]}_ms"] = ms
                scores[launch] += ms / results[f"kernel_sweep_{name.lower()}_{shape}_"
                                               f"{SWEEPS[name][0][0]}x{SWEEPS[name][0][1]}_ms"]
        best = min(scores, key=scores.get)
        setattr(module, name, best)
        results[f"kernel_sweep_{name.lower()}_best"] = list(best)


@torch.inference_mode()
def layer_breakdown(tower: VisionTower, results: dict) -> None:
    """GPU time of each op of one layer at 1024x1024 (4,096 patches), each timed alone."""
    from shared.kernels import silu_and_mul
    from services.vision import kernels
    attention = sdpa.attention
    layer, ops, spec = tower.layers[0], tower.ops, tower.spec
    n, heads, dim = 4096, spec.num_heads, spec.head_dim
    x = torch.randn(n, spec.hidden_size, device=DEVICE, dtype=DTYPE)
    angles = torch.rand(n, dim // 2, device=DEVICE) * 6.28   # a rotation: repeated in place, values stay finite
    cos, sin = angles.cos(), angles.sin()
    qkv = layer.qkv_proj(x)
    q, k, v = (t.view(1, n, heads, dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    hidden = torch.nn.functional.linear(x, layer.gate_up_proj.weight)
    activated = silu_and_mul(hidden, spec.gate_up_group)
    figures = {
        "add_rms_norm": lambda: ops.add_rms_norm(x, layer.attention_norm, 1e-5, x),
        "qkv_proj": lambda: layer.qkv_proj(x),
        "rotate_qk": lambda: rotate_heads_(qkv, cos, sin, 2 * heads, dim),
        "qkv_rotated_paired": lambda: kernels.qkv_rotated(x, layer.qkv_proj.weight, cos, sin, heads, dim),
        "attention_strided": lambda: attention(q, k, v),
        "attention_contiguous": lambda: attention(qc, kc, vc),
        "o_proj": lambda: layer.o_proj(x),
        "gate_up_proj": lambda: torch.nn.functional.linear(x, layer.gate_up_proj.weight),
        "silu_and_mul": lambda: silu_and_mul(hidden, spec.gate_up_group),
        "gate_up_swiglu_paired": lambda: kernels.gate_up_swiglu(x, layer.gate_up_proj.weight, spec.gate_up_group),
        "down_proj": lambda: layer.down_proj(activated),
    }
    for name, fn in figures.items():
        results[f"layer_1024_{name}_ms"] = bench_ms(fn)
    # the patch embedding of a 1024x1024 image: as the checkpoint's convolution (cuDNN), and as our matmul
    images = torch.randn(1, spec.num_channels, 1024, 1024, device=DEVICE, dtype=DTYPE)
    weight = tower.patch_embedding.weight.view(spec.hidden_size, spec.num_channels, spec.patch_size, spec.patch_size)
    convolved = torch.nn.functional.conv2d(images, weight, stride=spec.patch_size).flatten(2).transpose(1, 2)
    results["patch_embedding_1024_relative_error"] = relative_error(tower.embed_patches(images), convolved)
    results["patch_conv_1024_ms"] = bench_ms(lambda: torch.nn.functional.conv2d(images, weight, stride=spec.patch_size))
    results["patch_embedding_1024_ms"] = bench_ms(lambda: tower.embed_patches(images))


@torch.inference_mode()
def encoder_figures(results: dict) -> None:
    from transformers import PixtralVisionModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = pixtral_12b_config()
    torch.manual_seed(0)
    with torch.device(DEVICE):
        hf = PixtralVisionModel._from_config(config.vision_config, dtype=DTYPE, attn_implementation="sdpa").eval()
        projector = LlavaMultiModalProjector(config).to(DTYPE).eval()
    spec = VisionSpec.from_config(config.vision_config)
    with torch.device("meta"):
        tower = VisionTower(spec, use_fused_kernels=True)
    tower.load_state_dict(state_from_checkpoint(dict(hf.state_dict()), spec), assign=True)
    tower.eval()

    def hf_features(pixels: torch.Tensor) -> torch.Tensor:
        sizes = torch.tensor([list(pixels.shape[1:])], device=DEVICE)
        return hf(pixels[None], image_sizes=sizes).last_hidden_state[0]

    # A worker's steady state: the shapes measured here are frequent ones, on cuDNN's attention (shared/sdpa.py);
    # flash attention, which a shape gets while it is rare, is measured at the end.
    sdpa.CUDNN_AFTER = 0
    p512, p1024 = pixels_of(512, 512, 1), pixels_of(1024, 1024, 2)
    reference = hf_features(p512).float()
    ours = tower([p512])[0].float()
    results["relative_error_vs_transformers_bf16"] = relative_error(ours, reference)

    results["hf_tower_1024_ms"] = 1000 * timed(lambda: hf_features(p1024), repeats=20, warmup=3)
    results["hf_get_image_features_1024_ms"] = 1000 * timed(lambda: projector(hf_features(p1024)[None]),
                                                            repeats=20, warmup=3)
    results["ours_1024_eager_ms"] = 1000 * timed(lambda: tower([p1024]), repeats=20, warmup=3)
    graph = graphed(tower, [p1024])
    results["ours_1024_graph_ms"] = 1000 * timed(lambda: graph([p1024]), repeats=20, warmup=3)
    results["hf_512_one_at_a_time_img_s"] = 8 / timed(lambda: [hf_features(p512) for _ in range(8)], repeats=3)
    for batch in (1, 2, 4, 8, 16, 32):
        inputs = [pixels_of(512, 512, 10 + i) for i in range(batch)]
        results[f"ours_512_batch{batch}_eager_img_s"] = batch / timed(lambda: tower(inputs), repeats=5)
        graph = graphed(tower, inputs)
        results[f"ours_512_batch{batch}_graph_img_s"] = batch / timed(lambda: graph(inputs), repeats=5)
    # the worker's path (numpy pixels in, features on the host out), eager and with its graphs of frequent shapes
    for size in (512, 1024):
        image = preprocess(noise_png(size, size, 3), 10**8)
        for label, max_graphs in (("eager", 0), ("graphs", 8)):
            encoder = VisionEncoder(tower, DEVICE, DTYPE, max_graphs)
            for _ in range(sdpa.CUDNN_AFTER // spec.num_layers + 2):   # until the shape is captured
                encoder.encode([image])
            results[f"encoder_{size}_{label}_ms"] = 1000 * timed(lambda: encoder.encode([image]), repeats=20)
    layer_breakdown(tower, results)
    for batch in (1, 4, 8, 16):
        inputs = [pixels_of(*MIXED[i % len(MIXED)], seed=50 + i) for i in range(batch)]
        results[f"ours_mixed_batch{batch}_eager_img_s"] = batch / timed(lambda: tower(inputs), repeats=5)
        results[f"ours_mixed_batch{batch}_patches"] = sum(x.shape[1] * x.shape[2] // 256 for x in inputs)
    sdpa.CUDNN_AFTER = 10**9
    graph = graphed(tower, [p1024])
    results["ours_1024_graph_flash_ms"] = 1000 * timed(lambda: graph([p1024]), repeats=20, warmup=3)
    rows = torch.randn(1, 4096, 1024, device=DEVICE, dtype=DTYPE)
    results["projector_4096_rows_ms"] = 1000 * timed(lambda: projector(rows), repeats=20, warmup=3)


def preprocessing_figures(results: dict) -> None:
    for size in (512, 1024):
        png = noise_png(size, size, 3)
        buffer = io.BytesIO()
        Image.open(io.BytesIO(png)).save(buffer, "JPEG", quality=90)
        for fmt, data in (("png", png), ("jpeg", buffer.getvalue())):
            results[f"preprocess_{size}_{fmt}_ms"] = 1000 * timed(lambda: preprocess(data, 10**8), repeats=10)
            for threads in (8, 16):
                with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                    started = time.perf_counter()
                    list(pool.map(lambda _: preprocess(data, 10**8), range(64)))
                    results[f"preprocess_{size}_{fmt}_{threads}threads_img_s"] = 64 / (time.perf_counter() - started)


def cache_figures(results: dict, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    sha = "ab" * 32
    for size in (512, 1024):
        rows = (size // 16) ** 2
        for layout, columns in (("pre_projector", 1024), ("post_projector", 5120)):
            value = encode_entry(torch.randn(rows, columns).to(DTYPE), (size // 16, size // 16), "f" * 16, sha)
            key = f"bench:{layout}:{size}"
            results[f"cache_{layout}_{size}_mib"] = len(value) / 2**20
            results[f"redis_set_{layout}_{size}_ms"] = 1000 * timed(lambda: client.set(key, value), repeats=10)
            results[f"redis_get_decode_{layout}_{size}_ms"] = 1000 * timed(
                lambda: decode_entry(client.get(key), fingerprint="f" * 16, sha256=sha, num_columns=columns),
                repeats=10)
            client.delete(key)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    results = {"device": gpu_name()}
    kernel_sweep(results)
    encoder_figures(results)
    preprocessing_figures(results)
    cache_figures(results, args.redis)
    save("vision", results)


if __name__ == "__main__":
    main()
