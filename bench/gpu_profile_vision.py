"""The vision part of bench/gpu_profile.py (`--part vision`): the paired matmuls under several launch shapes
beside cuBLAS and the separate kernels, the tower as one CUDA graph, the host's cost of eager passes,
alternatives not taken and the memory the worker's graphs hold."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from bench.common import gpu_name, timed
from bench.gpu_profile import DEVICE, DTYPE, graph_us, kernel_table


def chunked_mlp_forward(chunk: int):
    """VisionLayer.forward of one image with its MLP run over `chunk` rows at a time (the gate/up output of a
    chunk fits in L2 for the SwiGLU and the down projection to read)."""
    from shared import sdpa

    def forward(self, x, residual, cos, sin, groups, ops):
        spec = self.spec
        heads, dim = spec.num_heads, spec.head_dim
        normed, residual = ops.add_rms_norm(x, self.attention_norm, spec.rms_norm_eps, residual)
        q, k, v = ops.qkv_rotated(normed, self.qkv_proj.weight, cos, sin, heads, dim)
        shape = (groups[0].count, groups[0].num_patches, heads, dim)
        out = sdpa.attention(*(t.view(shape).transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        normed, residual = ops.add_rms_norm(self.o_proj(out.reshape(x.shape[0], -1)), self.ffn_norm,
                                            spec.rms_norm_eps, residual)
        y = torch.empty_like(normed)
        for start in range(0, normed.shape[0], chunk):
            rows = slice(start, start + chunk)
            activated = ops.gate_up_swiglu(normed[rows], self.gate_up_proj.weight, spec.gate_up_group)
            torch.mm(activated, self.down_proj.weight.t(), out=y[rows])
        return y, residual
    return forward


PAIRED_SWEEP = {
    "ROPE_LAUNCH": [(128, 128, 64, 8, 3, True), (128, 128, 64, 8, 3, False), (128, 256, 64, 8, 3, True),
                    (128, 128, 64, 8, 4, True), (256, 128, 64, 8, 3, True)],
    "SWIGLU_LAUNCH": [(128, 128, 64, 8, 3, False), (128, 128, 64, 8, 3, True), (128, 256, 64, 8, 3, False),
                      (128, 256, 64, 8, 3, True), (256, 128, 64, 8, 3, False), (256, 128, 64, 8, 3, True),
                      (128, 128, 64, 8, 4, False), (64, 256, 64, 4, 3, False)]}


def paired_sweep(results: dict) -> None:
    """The qkv projection with RoPE and the gate/up projection with SwiGLU in one kernel each
    (services/vision/kernels.py), under each launch shape, beside cuBLAS followed by the rotation and SwiGLU
    kernels (µs, graph-timed), at the rows of one 1024x1024 image and of sixteen 512x512. The launch shape of
    least summed time is kept for the rest of the run."""
    from shared.kernels import silu_and_mul
    from services.vision import kernels
    from services.vision.model import GATE_UP_GROUP
    heads, dim, hidden, inner = 16, 64, 1024, 4096
    torch.manual_seed(0)
    qkv_weight = torch.randn(3 * hidden, hidden, device=DEVICE, dtype=DTYPE) / 32
    gate_up_weight = torch.randn(2 * inner, hidden, device=DEVICE, dtype=DTYPE) / 32
    scores = defaultdict(float)
    for rows in (4096, 16384):
        x = torch.randn(rows, hidden, device=DEVICE, dtype=DTYPE)
        angles = torch.rand(rows, dim // 2, device=DEVICE) * 6.28
        cos, sin = angles.cos(), angles.sin()

        def qkv_separate():
            out = F.linear(x, qkv_weight)
            kernels.rotate_heads_(out, cos, sin, 2 * heads, dim)
            return out
        separate = {"ROPE_LAUNCH": qkv_separate,
                    "SWIGLU_LAUNCH": lambda: silu_and_mul(F.linear(x, gate_up_weight), GATE_UP_GROUP)}
        fused = {"ROPE_LAUNCH": lambda: kernels.qkv_rotated(x, qkv_weight, cos, sin, heads, dim),
                 "SWIGLU_LAUNCH": lambda: kernels.gate_up_swiglu(x, gate_up_weight, GATE_UP_GROUP)}
        results[f"paired_qkv_{rows}_cublas_then_rotation_us"] = graph_us(qkv_separate)
        results[f"paired_qkv_{rows}_cublas_alone_us"] = graph_us(lambda: F.linear(x, qkv_weight))
        results[f"paired_gate_up_{rows}_cublas_then_swiglu_us"] = graph_us(separate["SWIGLU_LAUNCH"])
        results[f"paired_gate_up_{rows}_cublas_then_swiglu_ungrouped_us"] = graph_us(
            lambda: silu_and_mul(F.linear(x, gate_up_weight)))
        results[f"paired_gate_up_{rows}_cublas_alone_us"] = graph_us(lambda: F.linear(x, gate_up_weight))
        for name, launches in PAIRED_SWEEP.items():
            for launch in launches:
                setattr(kernels, name, launch)
                label = f"paired_{name.lower()}_{rows}_{'x'.join(map(str, launch))}"
                try:
                    results[f"{label}_us"] = graph_us(fused[name])
                    scores[name, launch] += results[f"{label}_us"]
                except Exception as error:  # noqa: BLE001 - a launch shape this GPU cannot run (shared memory)
                    results[f"{label}_error"] = str(error)[:300]
                    scores[name, launch] = float("inf")
            results[f"paired_{name.lower()}_{rows}_relative_error"] = float(
                (fused[name]().float() - separate[name]().float()).norm() / separate[name]().float().norm())
    for name, launches in PAIRED_SWEEP.items():
        setattr(kernels, name, min(launches, key=lambda launch: scores[name, launch]))
        results[f"paired_{name.lower()}_best"] = list(getattr(kernels, name))


@torch.inference_mode()
def eager_costs(tower, results: dict) -> None:
    """The host's side of eager forward passes (shapes a worker has not captured): the time to launch one paired
    matmul and its cuBLAS-then-kernel counterpart on 16 rows (the GPU's part negligible), and the tower eager on
    512x512 batches and mixed sizes with the paired matmuls at every size and at none, alternated (the tower takes
    them from model.PAIRED_EAGER_MIN_ROWS rows)."""
    from bench.gpu_vision import MIXED, pixels_of
    from shared.kernels import silu_and_mul
    from services.vision import kernels, model
    spec, layer = tower.spec, tower.layers[0]
    x = torch.randn(16, spec.hidden_size, device=DEVICE, dtype=DTYPE)
    angles = torch.rand(16, spec.head_dim // 2, device=DEVICE)
    cos, sin = angles.cos(), angles.sin()

    def separate_qkv():
        out = F.linear(x, layer.qkv_proj.weight)
        kernels.rotate_heads_(out, cos, sin, 2 * spec.num_heads, spec.head_dim)
    calls = {"qkv_paired": lambda: kernels.qkv_rotated(x, layer.qkv_proj.weight, cos, sin, spec.num_heads,
                                                         spec.head_dim),
             "qkv_separate": separate_qkv,
             "gate_up_paired": lambda: kernels.gate_up_swiglu(x, layer.gate_up_proj.weight, spec.gate_up_group),
             "gate_up_separate": lambda: silu_and_mul(F.linear(x, layer.gate_up_proj.weight), spec.gate_up_group)}
    for name, fn in calls.items():
        results[f"host_{name}_us"] = 1e6 * timed(lambda: [fn() for _ in range(200)], repeats=5) / 200
    batches = {f"512_batch{n}": [pixels_of(512, 512, 10 + i) for i in range(n)] for n in (1, 4, 8, 16, 32)}
    batches.update({f"mixed_batch{n}": [pixels_of(*MIXED[i % len(MIXED)], seed=50 + i) for i in range(n)]
                    for n in (4, 16)})
    own = model.PAIRED_EAGER_MIN_ROWS
    for name, pixels in batches.items():
        for attempt in range(2):
            for label, min_rows in (("paired", 0), ("unpaired", 10**9)):
                model.PAIRED_EAGER_MIN_ROWS = min_rows
                results[f"eager_{name}_{label}_ms_{attempt}"] = 1000 * timed(lambda: tower(pixels), repeats=10)
    model.PAIRED_EAGER_MIN_ROWS = own


@torch.inference_mode()
def vision_profile() -> dict:
    from bench.gpu_vision import bench_ms, graphed, pixels_of
    from services.vision.encoder import random_tower
    from services.vision.graphs import TowerGraphs
    from services.vision.model import VisionLayer, VisionSpec
    from shared import sdpa
    from shared.tiny import pixtral_12b_config

    sdpa.CUDNN_AFTER = 0
    tower = random_tower(VisionSpec.from_config(pixtral_12b_config().vision_config), DTYPE, DEVICE, seed=0)
    p1024 = pixels_of(1024, 1024, 2)
    from torch.nn.attention.flex_attention import flex_attention
    q, k, v = (torch.randn(1, 16, 4096, 64, device=DEVICE, dtype=DTYPE) for _ in range(3))
    flex = torch.compile(flex_attention)
    attention = {"attention_1024_cudnn_us": 1000 * bench_ms(lambda: sdpa.attention(q, k, v)),
                 "attention_1024_flex_us": 1000 * bench_ms(lambda: flex(q, k, v))}

    def graph_ms() -> float:
        graph = graphed(tower, [p1024])
        return 1000 * timed(lambda: graph([p1024]), repeats=20, warmup=3)
    results = {"device": gpu_name()}
    paired_sweep(results)
    graph = graphed(tower, [p1024])
    results.update({"tower_1024_eager_ms": 1000 * timed(lambda: tower([p1024]), repeats=20, warmup=3),
                    "tower_1024_graph_ms": graph_ms(),
                    "tower_1024_graph": kernel_table(lambda: graph([p1024]), repeats=10), **attention})
    # the same tower with cuBLAS for the qkv and gate/up projections, and RoPE and SwiGLU as kernels of their own
    tower.ops.paired_matmuls = False
    results["tower_1024_graph_unpaired_ms"] = graph_ms()
    graph = graphed(tower, [p1024])
    results["tower_1024_graph_unpaired"] = kernel_table(lambda: graph([p1024]), repeats=10)
    tower.ops.paired_matmuls = True
    results["tower_1024_graph_ms_again"] = graph_ms()
    eager_costs(tower, results)
    # alternatives measured and not taken: cuBLASLt for the matmuls, the MLP in row chunks, FlexAttention
    torch.backends.cuda.preferred_blas_library("cublaslt")
    results["alternative_cublaslt_graph_ms"] = graph_ms()
    torch.backends.cuda.preferred_blas_library("cublas")
    own_forward = VisionLayer.forward
    try:
        for chunk in (2048, 1024):
            VisionLayer.forward = chunked_mlp_forward(chunk)
            results[f"alternative_mlp_chunks_of_{chunk}_graph_ms"] = graph_ms()
    finally:
        VisionLayer.forward = own_forward
    # the memory a worker's graphs hold (one pool): after capturing each of these batch shapes in turn
    graphs = TowerGraphs(tower, capacity=8, after=1)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    for count, size in ((1, 1024), (8, 512), (2, 1024)):   # up to graphs.MAX_PIXELS
        graphs([pixels_of(size, size, 100 + i) for i in range(count)])
        torch.cuda.empty_cache()
        results[f"graphs_memory_after_{count}x{size}_gib"] = (torch.cuda.memory_reserved() - before) / 2**30
    return results
