"""Where the GPU time of a decode step and of a vision forward goes: per-kernel tables from torch.profiler,
full Pixtral-12B shape, random bf16 weights, one CUDA GPU.

    python -m bench.gpu_profile [--part decoder|vision|all]    # results in $OUT/profile_*.json

Decoder: the paged decode attention under several launch shapes (`paged_*`); each weight matmul of a decode step
at 1 to 32 rows, cuBLAS beside matmul_kernels.skinny_linear under several launch shapes (`linear_*`, µs and weight bytes
read per second); the captured batch-1 decode graph of a 1024x1024 image prompt (4,183 tokens of context) with the
weight matmuls on cuBLAS and on matmul_kernels.skinny_linear, replayed.

Vision: the paired matmuls (services/vision/kernels.py) under several launch shapes, beside cuBLAS and the
separate kernels (`paired_*`); the tower captured as one CUDA graph for a 1024x1024 image, replayed, with the
paired matmuls and without; the host's cost of eager passes (`host_*`, `eager_*`); alternatives not taken
(`alternative_*`, FlexAttention); the memory the worker's graphs hold (`graphs_memory_*`).

Kernels are grouped by name; `busy_fraction` is kernel time over wall time (the rest is the gaps between kernels).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from bench.common import OUT, gpu_name, image_prompt, save, timed

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16


def kernel_table(fn, repeats: int) -> dict:
    """Runs fn() `repeats` times under the profiler -> kernels grouped by name, µs per call of fn."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    path = OUT / "trace.json"
    OUT.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("cat") == "kernel"]
    path.unlink()
    by_name: dict[str, list[float]] = defaultdict(list)
    for event in events:
        name = re.sub(r"\s+", " ", event["name"])[:120]
        by_name[name].append(event["dur"])
    rows = sorted(((sum(d) / repeats, len(d) / repeats, name) for name, d in by_name.items()), reverse=True)
    span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / repeats if events else 0.0
    busy = sum(r[0] for r in rows)
    return {"kernels_per_call": len(events) / repeats, "kernel_us_per_call": busy, "wall_us_per_call": span,
            "busy_fraction": busy / span if span else None,
            "table": [{"us": round(us, 2), "calls": calls, "kernel": name} for us, calls, name in rows[:40]]}


def graph_us(fn) -> float:
    from shared.kernels import graph_time
    return 1000 * graph_time(fn, calls=20, replays=20)


LINEAR_LAUNCHES = [(32, 256, 4, 4), (64, 128, 4, 3), (64, 256, 4, 4), (64, 256, 4, 6), (128, 128, 4, 3),
                   (128, 256, 8, 4)]


@torch.inference_mode()
def linear_sweep(spec, results: dict) -> None:
    """Each weight matmul of a decode step at 1..32 rows: cuBLAS and matmul_kernels.skinny_linear under each launch shape."""
    from triton.runtime.errors import OutOfResources

    from services.decoder import matmul_kernels as kernels
    qkv_out = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    shapes = {"qkv": (spec.hidden_size, qkv_out), "o": (spec.num_heads * spec.head_dim, spec.hidden_size),
              "gate_up": (spec.hidden_size, 2 * spec.intermediate_size),
              "down": (spec.intermediate_size, spec.hidden_size),
              "lm_head": (spec.hidden_size, spec.vocab_size)}
    own_launch, own_rows = kernels.SKINNY_LAUNCH, kernels.SKINNY_MAX_ROWS
    kernels.SKINNY_MAX_ROWS = 32
    try:
        for name, (k, n) in shapes.items():
            weight = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * 0.02
            gigabytes = weight.numel() * weight.element_size() / 1e9
            for rows in (1, 2, 4, 8, 16, 32):
                x = torch.randn(rows, k, device=DEVICE, dtype=DTYPE)
                key = f"linear_{name}_m{rows}"
                results[key + "_cublas_us"] = graph_us(lambda: F.linear(x, weight))
                reference = F.linear(x, weight).float()
                timings = {}
                for launch in LINEAR_LAUNCHES:
                    kernels.SKINNY_LAUNCH = launch
                    try:
                        out = kernels.skinny_linear(x, weight).float()
                    except OutOfResources:   # too much shared memory for this many rows
                        continue
                    assert (out - reference).norm() / reference.norm() < 1e-2, (key, launch)
                    timings[launch] = graph_us(lambda: kernels.skinny_linear(x, weight))
                best = min(timings, key=timings.get)
                results[key + "_ours_us"] = timings.get(own_launch)
                results[key + "_best_launch"] = [*best, round(timings[best], 2)]
                results[key + "_cublas_tb_s"] = gigabytes / results[key + "_cublas_us"] * 1e3
                results[key + "_ours_tb_s"] = gigabytes / timings[own_launch] * 1e3 if own_launch in timings else None
    finally:
        kernels.SKINNY_LAUNCH, kernels.SKINNY_MAX_ROWS = own_launch, own_rows


@torch.inference_mode()
def paged_attention_sweep(spec, results: dict) -> None:
    """The paged decode kernel (with its combine) at batch 1 over a 4,200-token context and at 32 and 64 over
    1,100 tokens: context splits x launch shapes, and the split count and launch the engine chooses. (64 columns,
    3 stages, at most 32 splits) was the launch before decode_launch."""
    from services.decoder import kernels
    own = kernels.decode_launch
    block = 16
    try:
        for batch, context in ((1, 4200), (32, 1100), (64, 1100)):
            blocks = -(-context // block)
            k_cache = torch.randn(batch * blocks * block, spec.num_kv_heads, spec.head_dim, device=DEVICE, dtype=DTYPE)
            v_cache = torch.randn_like(k_cache)
            tables = torch.randperm(batch * blocks, device=DEVICE).int().view(batch, blocks)
            lengths = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
            q = torch.randn(batch, spec.num_heads, spec.head_dim, device=DEVICE, dtype=DTYPE)
            num_sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
            chosen = kernels.num_decode_splits(batch, spec.num_kv_heads, num_sms)

            def attend(splits: int) -> torch.Tensor:
                return kernels.paged_decode_attention(q, k_cache, v_cache, tables, lengths, 0.088, block, splits)
            results[f"paged_b{batch}_chosen_us"] = graph_us(lambda: attend(chosen))
            results[f"paged_b{batch}_chosen_splits"] = chosen
            for block_n, stages in ((64, 1), (32, 2), (64, 3)):
                kernels.decode_launch = lambda splits: dict(BLOCK_N=block_n, num_stages=stages, num_warps=4)
                for splits in sorted({chosen, min(chosen, 32), 16, 32, 64, 128}):
                    results[f"paged_b{batch}_s{splits}_n{block_n}_st{stages}_us"] = graph_us(lambda: attend(splits))
                kernels.decode_launch = own
    finally:
        kernels.decode_launch = own


@torch.inference_mode()
def decoder_profile() -> dict:
    from bench.gpu_decoder import run_until, sequence
    from services.decoder import matmul_kernels as kernels
    from services.decoder.config import DecoderConfig
    from services.decoder.factory import build_engine_for
    from services.decoder.model import TextModelSpec
    from services.decoder.weights import random_decoder
    from shared.tiny import pixtral_12b_config

    spec = TextModelSpec.from_config(pixtral_12b_config())
    results = {"device": gpu_name()}
    linear_sweep(spec, results)
    paged_attention_sweep(spec, results)
    model = random_decoder(spec, DTYPE, DEVICE, seed=0)
    config = DecoderConfig.load(["--device", "cuda", "--max-num-seqs", "64", "--max-num-batched-tokens", "8192"])
    engine, _ = build_engine_for(model, config, DEVICE)
    results["skinny_linear_weights"] = sorted(engine.runner.ops.skinny_shapes)
    features = torch.randn(4096, spec.vision_hidden_size, device=DEVICE, dtype=DTYPE)
    seq = sequence(0, image_prompt(1024, 1024, seed=1), 10_000, features)
    engine.add(seq, lambda output: None)
    own_rows = kernels.SKINNY_MAX_ROWS
    # the batch-1 step with the weight matmuls on cuBLAS, on kernels.skinny_linear where it was chosen at start-up,
    # and on cuBLAS again: graphs captured again for each
    for index, (label, max_rows) in enumerate((("cublas", 0), ("ours", own_rows), ("cublas_again", 0))):
        kernels.SKINNY_MAX_ROWS = max_rows
        engine.runner.graphs.capture()
        engine.overlap = False
        run_until(engine, lambda: seq.num_output_tokens >= 8 + 72 * index)
        graph = engine.runner.graphs.graphs[1]   # its inputs: the last step of this sequence
        results[f"graph_replay_b1_{label}_ms"] = 1000 * timed(graph.replay, repeats=50, warmup=5)
        results[f"decode_b1_graph_{label}"] = kernel_table(graph.replay, repeats=20)
        engine.overlap = True
        engine.step()
        started, steps = time.perf_counter(), 64
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        results[f"decode_b1_{label}_tok_s"] = steps / (time.perf_counter() - started)
    kernels.SKINNY_MAX_ROWS = own_rows
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("decoder", "vision", "all"), default="all")
    args = parser.parse_args()
    if args.part in ("vision", "all"):
        from bench.gpu_profile_vision import vision_profile
        save("profile_vision", vision_profile())
    if args.part in ("decoder", "all"):
        save("profile_decoder", decoder_profile())


if __name__ == "__main__":
    main()
