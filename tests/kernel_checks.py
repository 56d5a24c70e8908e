"""Checks of the Triton kernels against plain PyTorch, run under TRITON_INTERPRET=1 on the CPU.

Run by tests/test_kernels.py (CHECKS) and tests/test_fp8.py (FP8_CHECKS) in a subprocess (the interpreter must be
chosen before triton is imported); `python -m tests.kernel_checks [all|fp8|NAME...]` runs them by hand, and on a
CUDA machine without the interpreter too.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") else "cpu")
# The interpreter's bfloat16 matmul and rounding are not the GPU's: it checks float32, the GPU checks both.
DTYPES = [(torch.float32, 1e-5)] + ([(torch.bfloat16, 2e-2)] if DEVICE.type == "cuda" else [])


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def launches(module, name: str, choices):
    """Runs the body of a loop under each launch shape of a kernel, then restores the module's own."""
    own = getattr(module, name)
    try:
        for choice in choices:
            setattr(module, name, choice)
            yield choice
    finally:
        setattr(module, name, own)


def check_add_rms_norm() -> None:
    from shared import kernels
    for _ in launches(kernels, "RMS_NORM_LAUNCH", [(1, 8), (2, 4), (4, 4)]):   # 5 rows: a partly filled program
        for dtype, tolerance in DTYPES:
            x = torch.randn(5, 96, device=DEVICE).to(dtype)
            residual = torch.randn(5, 96, device=DEVICE).to(dtype)
            weight = (1 + 0.1 * torch.randn(96, device=DEVICE)).to(dtype)
            out, new_residual = kernels.add_rms_norm(x, weight, 1e-5, residual)
            summed = x + residual
            xf = summed.float()
            ref = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
            assert torch.equal(new_residual, summed), "residual sum"
            assert relative_error(out, ref) < tolerance, (dtype, relative_error(out, ref))
            out2, same = kernels.add_rms_norm(x, weight, 1e-5)
            assert same is x and relative_error(out2, weight * (x.float() * torch.rsqrt(
                x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)) < tolerance


def rope_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    freqs = positions.float()[:, None] * inv_freq[None]
    cos, sin = torch.cat((freqs, freqs), -1).cos()[:, None], torch.cat((freqs, freqs), -1).sin()[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def check_rotary_and_cache() -> None:
    from services.decoder.kernels import rotary_and_cache
    heads, kv_heads, dim, tokens = 4, 2, 16, 22   # more tokens than one program takes, and a partial block
    inv_freq = 1.0 / (1e9 ** (torch.arange(0, dim, 2, device=DEVICE).float() / dim))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device=DEVICE)
    positions = torch.tensor([0, 5, 9, 100, 4096, 7] + list(range(200, 216)), device=DEVICE)
    slots = torch.tensor([3, 0, 7, -1, 12, 1] + list(range(16, 30)) + [-1, 31], device=DEVICE)
    k_cache = torch.zeros(32, kv_heads, dim, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    q = rotary_and_cache(qkv, positions, inv_freq, k_cache, v_cache, slots, heads, kv_heads, dim)
    q_ref, k_ref, v_ref = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    assert relative_error(q, rope_reference(q_ref.view(tokens, heads, dim), positions, inv_freq)) < 1e-5
    k_rot = rope_reference(k_ref.view(tokens, kv_heads, dim), positions, inv_freq)
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert relative_error(k_cache[slot], k_rot[token]) < 1e-5
            assert torch.equal(v_cache[slot], v_ref[token].view(kv_heads, dim))
    assert not k_cache[[2, 4, 5, 30]].any(), "a slot -1 row was written"


def check_paged_decode_attention() -> None:
    from services.decoder.kernels import paged_decode_attention
    torch.manual_seed(0)
    heads, kv_heads, dim, block_size, num_blocks = 8, 2, 64, 16, 40
    for dtype, tolerance in DTYPES:
        k_cache = torch.randn(num_blocks * block_size, kv_heads, dim, device=DEVICE).to(dtype)
        v_cache = torch.randn_like(k_cache)
        contexts = [1, 17, 130, 0, 300]          # 0: a padding row
        tables = torch.zeros(len(contexts), 24, dtype=torch.int32, device=DEVICE)
        permutation = torch.randperm(num_blocks).tolist()
        for row, context in enumerate(contexts):
            need = -(-context // block_size)
            tables[row, :need] = torch.tensor([permutation.pop() for _ in range(need)], dtype=torch.int32)
        q = torch.randn(len(contexts), heads, dim, device=DEVICE).to(dtype)
        lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
        for splits in (1, 3, 8, 64):   # 64: the other launch shape (decode_launch)
            out = paged_decode_attention(q, k_cache, v_cache, tables, lens, dim ** -0.5, block_size, splits)
            for row, context in enumerate(contexts):
                if context == 0:
                    assert not out[row].any()
                    continue
                slots = (tables[row, :, None].long() * block_size + torch.arange(block_size, device=DEVICE))
                slots = slots.flatten()[:context]
                key, value = k_cache[slots].transpose(0, 1), v_cache[slots].transpose(0, 1)
                ref = F.scaled_dot_product_attention(q[row][:, None].float(), key.float(), value.float(),
                                                     scale=dim ** -0.5, enable_gqa=True)[:, 0]
                error = relative_error(out[row], ref)
                assert error < tolerance, (dtype, splits, row, error)


def check_silu_and_mul() -> None:
    from shared import kernels
    for _ in launches(kernels, "SILU_LAUNCH", [(1024, 4), (2048, 8)]):
        for dtype, tolerance in DTYPES:
            x = torch.randn(3, 2 * 1500, device=DEVICE).to(dtype)
            gate, up = x.split(1500, -1)
            assert relative_error(kernels.silu_and_mul(x), F.silu(gate) * up) < tolerance


def check_linear() -> None:
    from services.decoder import matmul_kernels as kernels
    for launch in launches(kernels, "SKINNY_LAUNCH", [(64, 256, 4, 4), (32, 128, 4, 3)]):
        for dtype, tolerance in DTYPES:
            for rows, k in ((1, 512), (5, 300), (16, 256), (17, 256)):   # K a multiple of the step or not; 17: cuBLAS
                x = torch.randn(rows, k, device=DEVICE).to(dtype)
                weight = torch.randn(200, k, device=DEVICE).to(dtype)    # 200 columns: a partly filled program
                out = kernels.skinny_linear(x, weight)
                assert out.shape == (rows, 200) and out.dtype == dtype
                assert relative_error(out, x.float() @ weight.float().T) < tolerance, (launch, dtype, rows, k)
        x = torch.randn(4, 64, device=DEVICE)[:, ::2]                    # not contiguous: cuBLAS
        weight = torch.randn(8, 32, device=DEVICE)
        assert torch.equal(kernels.skinny_linear(x, weight), F.linear(x, weight))
    from services.decoder.ops import TritonOps
    ops, x = TritonOps(), torch.randn(2, 64, device=DEVICE)
    chosen, other = torch.randn(48, 64, device=DEVICE), torch.randn(40, 64, device=DEVICE)
    ops.skinny_shapes = {(48, 64)}
    assert torch.equal(ops.linear(x, chosen), kernels.skinny_linear(x, chosen))
    assert torch.equal(ops.linear(x, other), F.linear(x, other))
    if DEVICE.type == "cuda":
        ops.choose_linear([chosen, other])
        assert ops.skinny_shapes <= {(48, 64), (40, 64)}


def check_fused_engine_matches_reference_engine() -> None:
    """The whole fused path (decode rows first, paged decode kernel, fused ops) against the reference ops."""
    from services.decoder.attention import KVCache
    from services.decoder.block_manager import BlockManager
    from services.decoder.engine import Engine
    from services.decoder.model import TextModelSpec
    from services.decoder.weights import random_decoder
    from services.decoder.model_runner import ModelRunner
    from services.decoder.step_inputs import ImageInputs
    from services.decoder.scheduler import Scheduler, SchedulerConfig
    from services.decoder.sequence import SamplingParams, Sequence

    spec = TextModelSpec(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, rope_theta=1e9, rms_norm_eps=1e-5,
                         max_position_embeddings=1024, vision_hidden_size=32, image_token_id=10, bos_token_id=1,
                         eos_token_id=2)
    model = random_decoder(spec, torch.float32, DEVICE, seed=1)
    for param in model.parameters():   # larger weights than 0.02: well separated logits
        param.data.mul_(5)
    results = []
    for fused in (False, True):
        cache = KVCache(2, 32, 16, 2, 16, torch.float32, DEVICE)
        runner = ModelRunner(model, cache, DEVICE, 4, 512, use_fused_kernels=fused)
        engine = Engine(runner, Scheduler(SchedulerConfig(4, 24), BlockManager(32, 16)), max_queued=4,
                        eos_token_id=spec.eos_token_id, probe_token_id=spec.bos_token_id)
        seqs = []
        for i, length in enumerate((30, 9, 17)):
            ids = [1] + [(37 * i + 11 * t) % 500 + 12 for t in range(length - 1)]
            images = None
            if i == 0:
                ids[3:9] = [10] * 6
                images = ImageInputs(torch.randn(6, 32, generator=torch.Generator().manual_seed(0)),
                                     torch.arange(3, 9))
            seqs.append(Sequence(f"s{i}", ids, len(ids), SamplingParams(6, temperature=0.8 * i, seed=i), 512, i,
                                 images))
        for seq in seqs:
            engine.add(seq, lambda output: None)
        while not all(seq.is_finished for seq in seqs):
            engine.step()
        results.append([seq.output_token_ids for seq in seqs])
    assert results[0] == results[1], results


def check_cuda_graph_decode_matches_eager() -> None:
    """CUDA only: decode steps replayed from captured graphs give the eager fused path's tokens (float32)."""
    if DEVICE.type != "cuda":
        raise NotApplicable("needs CUDA")
    from services.decoder.config import DecoderConfig
    from services.decoder.factory import build_engine_for
    from services.decoder.model import TextModelSpec
    from services.decoder.weights import random_decoder
    from services.decoder.sequence import SamplingParams, Sequence

    spec = TextModelSpec(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=3, num_heads=8,
                         num_kv_heads=2, head_dim=32, rope_theta=1e9, rms_norm_eps=1e-5,
                         max_position_embeddings=4096, vision_hidden_size=32, image_token_id=10, bos_token_id=1,
                         eos_token_id=2)
    model = random_decoder(spec, torch.float32, DEVICE, seed=3)
    for param in model.parameters():
        param.data.mul_(5)
    outputs = []
    for graphs in ("true", "false"):
        engine, _ = build_engine_for(model, DecoderConfig.load(
            ["--device", "cuda", "--kv-cache-gib", "0.05", "--max-num-seqs", "8", "--cuda-graphs", graphs]), DEVICE)
        seqs = [Sequence(f"s{i}", [1] + [(13 * i + 7 * t) % 1000 + 14 for t in range(20 + 37 * i)], 21 + 37 * i,
                         SamplingParams(24, temperature=0.7 * (i % 2), seed=i), 4096, i) for i in range(5)]
        for seq in seqs:
            engine.add(seq, lambda output: None)
        while not all(seq.is_finished for seq in seqs):
            engine.step()
        outputs.append([seq.output_token_ids for seq in seqs])
    assert outputs[0] == outputs[1], outputs


def check_rotate_heads() -> None:
    from services.vision import kernels
    from services.vision.model import apply_rotary
    for _ in launches(kernels, "ROTATE_LAUNCH", [(4096, 8), (8192, 8)]):
        for heads, dim, tokens in ((32, 64, 37), (6, 16, 5)):   # the tower's shape, and one with padded blocks
            for dtype, tolerance in DTYPES:
                qkv = torch.randn(tokens, 3 * heads // 2 * dim, device=DEVICE).to(dtype)
                angles = torch.rand(tokens, dim // 2, device=DEVICE) * 6.28
                cos, sin = angles.cos(), angles.sin()
                rotated = qkv.clone()
                kernels.rotate_heads_(rotated, cos, sin, heads, dim)
                x = qkv[:, :heads * dim].view(tokens, heads, dim).float()
                ref = apply_rotary(x, torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None])
                assert relative_error(rotated[:, :heads * dim].view(tokens, heads, dim), ref.to(dtype)) < tolerance
                assert torch.equal(rotated[:, heads * dim:], qkv[:, heads * dim:]), "only the first heads turn"


def paired_matmuls_case(tokens: int, dtype: torch.dtype, tolerance: float) -> None:
    from shared.kernels import silu_and_mul
    from services.vision import kernels
    from services.vision.model import TorchVisionOps, interleave
    heads, dim, hidden, inner, group = 4, 16, 64, 128, 32
    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    qkv_weight = (0.1 * torch.randn(3 * hidden, hidden, device=DEVICE)).to(dtype)
    angles = torch.rand(tokens, dim // 2, device=DEVICE) * 6.28
    cos, sin = angles.cos(), angles.sin()
    got = kernels.qkv_rotated(x, qkv_weight, cos, sin, heads, dim)
    want = torch.cat([t.reshape(tokens, -1) for t in TorchVisionOps.qkv_rotated(
        x.float(), qkv_weight.float(), cos, sin, heads, dim)], -1)
    assert relative_error(got, want) < tolerance, (dtype, relative_error(got, want))
    gate, up = (0.1 * torch.randn(2, inner, hidden, device=DEVICE)).to(dtype)
    want = F.silu(x.float() @ gate.float().T) * (x.float() @ up.float().T)
    gate_up = interleave(gate, up, group)
    assert relative_error(TorchVisionOps.gate_up_swiglu(x.float(), gate_up.float(), group), want) < 1e-5
    for got in (kernels.gate_up_swiglu(x, gate_up, group), silu_and_mul(F.linear(x, gate_up), group)):
        assert relative_error(got, want) < tolerance, (dtype, relative_error(got, want))


def check_paired_matmuls() -> None:
    """The qkv projection with RoPE and the gate/up projection with SwiGLU in the matmul's epilogue, and the
    SwiGLU kernel on gate and up columns that alternate in groups."""
    from services.vision import kernels
    own = kernels.ROPE_LAUNCH, kernels.SWIGLU_LAUNCH
    try:
        for launch in [(128, 128, 64, 8, 3, False), (32, 64, 32, 4, 2, True)]:
            kernels.ROPE_LAUNCH = kernels.SWIGLU_LAUNCH = launch
            for dtype, tolerance in DTYPES:
                for tokens in (37, 300):   # a partly filled row block, and several
                    paired_matmuls_case(tokens, dtype, tolerance)
    finally:
        kernels.ROPE_LAUNCH, kernels.SWIGLU_LAUNCH = own
    unaligned = torch.randn(5, 26, device=DEVICE)   # rows of 104 bytes: no TMA descriptor; the caller falls back
    assert kernels.gate_up_swiglu(unaligned, torch.randn(64, 26, device=DEVICE), 16) is None


def check_prefill_chunk_attention_matches_a_mask() -> None:
    """Flash attention's bottom-right causal mask is the chunk mask of the decoder's prefill (CUDA only)."""
    from shared.sdpa import prefill_chunk_attention
    if DEVICE.type != "cuda":
        raise NotApplicable("needs CUDA")
    for query_len, context_len in ((600, 1600), (37, 37 + 4096), (5, 5)):
        q = torch.randn(1, 32, query_len, 128, device=DEVICE, dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, context_len, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
        rows = torch.arange(context_len - query_len, context_len, device=DEVICE)
        mask = torch.arange(context_len, device=DEVICE)[None, :] <= rows[:, None]
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.1,
                                             enable_gqa=True)
        out = prefill_chunk_attention(q, k, v, 0.1)
        assert out is not None and relative_error(out, ref) < 2e-2, (query_len, relative_error(out, ref))


def check_prompt_chunks_attended_in_one_call() -> None:
    """AttentionBackend over a step of two decoding rows and four prompt chunks (a whole prompt, a later chunk of
    one, a one-row chunk after a cached prefix, a whole prompt of one token): each chunk's rows attend to its own
    context under the chunk mask, as SDPA with that mask computes it. On CUDA in bfloat16 the chunks take one
    variable-length flash attention call when they are packed (PackedPrefills, as the step inputs give it), one
    call each when not; on the CPU, and in float32, one call each either way."""
    from services.decoder.attention import AttentionBackend, AttentionMetadata, KVCache, PackedPrefills, \
        PrefillSpan
    torch.manual_seed(2)
    heads, kv_heads, dim, block_size, num_blocks = 8, 2, 64, 16, 40
    chunks = [(23, 23), (7, 50), (1, 96), (1, 1)]   # (query_len, context_len) of each chunk
    for dtype, tolerance in DTYPES:
        cache = KVCache(1, num_blocks, block_size, kv_heads, dim, dtype, DEVICE)
        keys, values = (torch.randn(num_blocks * block_size, kv_heads, dim, device=DEVICE) for _ in range(2))
        cache.keys[0].copy_(keys)
        cache.values[0].copy_(values)
        tables = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32, device=DEVICE)
        spans, row, first_block = [], 2, 3
        for query_len, context_len in chunks:   # each context in blocks of its own, after the decoding rows'
            slots = torch.arange(first_block * block_size, first_block * block_size + context_len, device=DEVICE)
            spans.append(PrefillSpan(row, query_len, context_len, slots))
            row, first_block = row + query_len, first_block + -(-context_len // block_size)
        q = torch.randn(row, heads, dim, device=DEVICE).to(dtype)
        packed = PackedPrefills.of(spans)
        assert (packed.first_row, packed.num_rows, packed.max_query, packed.max_context) == (2, 32, 23, 96)
        assert packed.cu_query.tolist() == [0, 23, 30, 31, 32] and packed.cu_context.tolist() == [0, 23, 73, 169, 170]
        assert torch.equal(packed.context_slots, torch.cat([span.context_slots for span in spans]))
        assert PackedPrefills.of([spans[0], spans[2]]) is None   # rows not one after the other: one call each
        for packed in (None, packed):
            meta = AttentionMetadata(slot_mapping=torch.full((row,), -1, device=DEVICE), num_decode=2,
                                     block_tables=tables, num_splits=1,
                                     context_lens=torch.tensor([20, 9], dtype=torch.int32, device=DEVICE),
                                     prefills=spans, packed=packed)
            out = AttentionBackend(cache, dim ** -0.5).attend(0, q, meta)
            for span in spans:
                rows = slice(span.query_start, span.query_start + span.query_len)
                positions = torch.arange(span.context_len - span.query_len, span.context_len, device=DEVICE)
                mask = torch.arange(span.context_len, device=DEVICE)[None, :] <= positions[:, None]
                ref = F.scaled_dot_product_attention(
                    q[rows].transpose(0, 1).float(), cache.keys[0][span.context_slots].transpose(0, 1).float(),
                    cache.values[0][span.context_slots].transpose(0, 1).float(), attn_mask=mask,
                    scale=dim ** -0.5, enable_gqa=True).transpose(0, 1)
                error = relative_error(out[rows], ref)
                assert error < tolerance, (dtype, packed is not None, span.query_len, span.context_len, error)


def check_image_row_staging_keeps_rows_in_flight() -> None:
    """CUDA only: image rows staged for the device arrive intact while the device is still busy with earlier work,
    and a buffer is not refilled before the copy out of it has run."""
    from services.decoder.staging import ImageRowStaging
    if DEVICE.type != "cuda":
        raise NotApplicable("needs CUDA")
    staging = ImageRowStaging(64, 32, torch.bfloat16)
    busy = torch.randn(4096, 4096, device=DEVICE)
    sent, arrived = [], []
    for step in range(6):
        for _ in range(20):   # device work queued ahead of the copy, so the copy runs well after the call returns
            busy = busy @ busy / 64
        parts = [torch.randn(n, 32).to(torch.bfloat16) for n in ((5, 17), (64,), (1, 2, 3))[step % 3]]
        sent.append(torch.cat(parts))
        arrived.append(staging.to_device(parts, DEVICE))
    too_many = [torch.randn(65, 32).to(torch.bfloat16)]   # more rows than the buffers hold: copied directly
    sent.append(too_many[0])
    arrived.append(staging.to_device(too_many, DEVICE))
    torch.cuda.synchronize()
    for expected, got in zip(sent, arrived):
        assert torch.equal(got.cpu(), expected)


def check_fused_vision_tower_matches_reference() -> None:
    from services.vision.model import VisionSpec, VisionTower
    spec = VisionSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, patch_size=16,
                      rope_theta=10000.0)
    towers = []
    for fused in (False, True):
        torch.manual_seed(0)
        with torch.device(DEVICE):
            tower = VisionTower(spec, use_fused_kernels=fused)
        for name, param in tower.named_parameters():
            if "norm" not in name and name != "ln_pre":
                param.data.normal_(0, 0.05)
        towers.append(tower)
    pixels = [torch.randn(3, h, w, device=DEVICE) for h, w in ((32, 48), (16, 16), (32, 48), (64, 32))]
    with torch.inference_mode():
        reference = towers[0](pixels)
        # as an eager pass of a few rows runs (cuBLAS, then RoPE and SwiGLU kernels), and as a captured one does
        for captured in (False, True):
            for a, b in zip(reference, towers[1](pixels, captured=captured)):
                assert relative_error(b, a) < 1e-5, (captured, relative_error(b, a))


def check_vision_graphs_match_eager() -> None:
    if DEVICE.type != "cuda":
        raise NotApplicable("needs CUDA")
    import numpy as np

    from services.vision.encoder import VisionEncoder
    from services.vision.model import VisionSpec, VisionTower
    spec = VisionSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, patch_size=16,
                      rope_theta=10000.0)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        tower = VisionTower(spec, use_fused_kernels=True).eval()
    encoder = VisionEncoder(tower, DEVICE, torch.float32, max_graphs=2)
    encoder.graphs.after = 2
    batches = [[np.random.rand(3, h, w).astype(np.float32) for h, w in sizes]
               for sizes in (((32, 48), (16, 16), (32, 48)), ((64, 32),))]
    for images in batches * 3:   # each shape: eager, captured, replayed
        with torch.inference_mode():
            eager = [rows.cpu() for rows in tower([torch.from_numpy(x).to(DEVICE) for x in images])]
        for got, want in zip(encoder.encode(images), eager):
            assert relative_error(got, want) < 1e-5, relative_error(got, want)
    assert len(encoder.graphs.graphs) == 2


# -- FP8 (e4m3) ---------------------------------------------------------------------------------------------------
# References are float32 computations over the dequantized e4m3 values, so the kernels are held to the tolerances
# of the checks above; where a kernel quantizes activations itself (W8A8), the unquantized product is a second
# reference, within e4m3's rounding (3 mantissa bits: a few percent).

E4M3_ROUNDING = 5e-2


def fp8_weight(num_rows: int, num_columns: int):
    """An Fp8Weight whose channels span three decades of magnitude, one of them all zeros."""
    from services.decoder.fp8 import quantize_weight
    weight = torch.randn(num_rows, num_columns, device=DEVICE) * torch.logspace(-2, 1, num_rows, device=DEVICE)[:, None]
    weight[3] = 0
    return quantize_weight(weight)


def check_fp8_skinny_linear() -> None:
    from services.decoder import matmul_kernels as kernels
    for launch in launches(kernels, "SKINNY_FP8_LAUNCH", [(64, 256, 4, 4), (32, 128, 4, 3)]):
        for dtype, tolerance in DTYPES:
            for rows, k in ((1, 512), (5, 300), (16, 256), (64, 256)):   # K a multiple of the step or not
                x = torch.randn(rows, k, device=DEVICE).to(dtype)
                weight = fp8_weight(200, k)                     # 200 columns: a partly filled program
                out = kernels.skinny_linear_fp8(x, weight.qweight, weight.scale)
                assert out.shape == (rows, 200) and out.dtype == dtype
                error = relative_error(out, x.float() @ weight.dequantize().T)
                assert error < tolerance, (launch, dtype, rows, k, error)
                assert not out[:, 3].any(), "an all-zero channel"
    weight = fp8_weight(48, 64)
    x = torch.randn(4, 128, device=DEVICE)[:, ::2]   # not contiguous
    assert relative_error(kernels.skinny_linear_fp8(x, weight.qweight, weight.scale),
                          x @ weight.dequantize().T) < DTYPES[0][1]
    if DEVICE.type == "cuda":   # the model's call: the ops pick this kernel for FP8 weights up to 16 rows
        from services.decoder.ops import TritonOps
        x = torch.randn(16, 64, device=DEVICE, dtype=torch.bfloat16)
        assert torch.equal(TritonOps().linear(x, weight), kernels.skinny_linear_fp8(x, weight.qweight, weight.scale))
        import triton
        # every launch the start-up measurement may choose computes the same product, at every row block
        weight = fp8_weight(320, 1536)
        for launch in kernels.SKINNY_FP8_LAUNCHES:
            for rows in (1, 16, 32, 64):
                x = torch.randn(rows, 1536, device=DEVICE, dtype=torch.bfloat16)
                try:
                    out = kernels.skinny_linear_fp8(x, weight.qweight, weight.scale, launch)
                except triton.runtime.errors.OutOfResources:
                    continue
                error = relative_error(out, x.float() @ weight.dequantize().T)
                assert error < DTYPES[-1][1], (launch, rows, error)
        ops = TritonOps()
        ops.choose_linear([weight])
        plan = ops.fp8_skinny[(320, 1536)]
        assert set(plan.launches) <= {16, 32, 64} and 16 in plan.launches and plan.max_rows >= 16, plan
        assert {kind for kind, _ in plan.launches.values()} <= set(kernels.SKINNY_FP8_KINDS), plan
        for rows in (1, 16, plan.max_rows):
            x = torch.randn(rows, 1536, device=DEVICE, dtype=torch.bfloat16)
            assert torch.equal(ops.linear(x, weight),
                               kernels.skinny_fp8(x, weight.qweight, weight.scale, *plan.launch_for(rows)))


def check_fp8_skinny_w8a8() -> None:
    """The W8A8 kernel of few rows (rows quantized per token, e4m3 x e4m3 with the weight tile as the left operand)
    against float32 arithmetic over the same codes, and a plan that chooses it."""
    from services.decoder import fp8_kernels
    from services.decoder import matmul_kernels as kernels
    for launch in launches(kernels, "SKINNY_W8A8_LAUNCH", [(64, 128, 4, 4), (128, 256, 8, 3)]):
        for dtype, tolerance in DTYPES:
            # Hopper's e4m3 tensor cores sum a tile's products in fewer bits than float32's
            tolerance = max(tolerance, 1e-3) if DEVICE.type == "cuda" else tolerance
            # K a multiple of both steps (128, 256), of one, of neither, shorter than one step
            for rows, k in ((1, 512), (5, 300), (16, 256), (33, 384), (64, 200)):
                x = torch.randn(rows, k, device=DEVICE).to(dtype)
                zero_rows = [rows // 2] if rows > 1 else []
                x[zero_rows] = 0                                # an all-zero row: its scale is MIN_AMAX's
                weight = fp8_weight(200, k)                     # 200 columns: a partly filled program of 64, 128
                out = kernels.skinny_linear_w8a8(x, weight.qweight, weight.scale)
                assert out.shape == (rows, 200) and out.dtype == dtype
                codes, scales = fp8_kernels.quantize_rows(x)
                exact = (codes.float() * scales) @ weight.dequantize().T
                error = relative_error(out, exact)
                assert error < tolerance, (launch, dtype, rows, k, error)
                unquantized = x.float() @ weight.dequantize().T
                assert relative_error(out, unquantized) < E4M3_ROUNDING, relative_error(out, unquantized)
                assert not out[:, 3].any() and not out[zero_rows].any(), "an all-zero channel or row"
    weight = fp8_weight(48, 64)
    x = torch.randn(4, 128, device=DEVICE)[:, ::2]   # not contiguous
    codes, scales = fp8_kernels.quantize_rows(x)
    assert relative_error(kernels.skinny_fp8(x, weight.qweight, weight.scale, "w8a8"),
                          (codes.float() * scales) @ weight.dequantize().T) < (
        max(DTYPES[0][1], 1e-3) if DEVICE.type == "cuda" else DTYPES[0][1])
    assert kernels.Fp8SkinnyPlan(16, {}, {}).launch_for(5) == ("upcast", None)
    try:
        kernels.skinny_fp8(x, weight.qweight, weight.scale, "bf16")
        raise AssertionError("an unknown kind ran")
    except ValueError:
        pass
    if DEVICE.type != "cuda":
        return
    import triton

    from services.decoder.ops import TritonOps
    from shared.cuda_graphs import capture
    # every launch the start-up measurement may choose computes the same product, at every row block
    weight = fp8_weight(320, 1536)
    for launch in kernels.SKINNY_W8A8_LAUNCHES:
        for rows in (1, 16, 32, 64):
            x = torch.randn(rows, 1536, device=DEVICE, dtype=torch.bfloat16)
            try:
                out = kernels.skinny_linear_w8a8(x, weight.qweight, weight.scale, launch)
            except triton.runtime.errors.OutOfResources:
                continue
            codes, scales = fp8_kernels.quantize_rows(x)
            error = relative_error(out, (codes.float() * scales) @ weight.dequantize().T)
            assert error < DTYPES[-1][1], (launch, rows, error)
    x = torch.randn(24, 1536, device=DEVICE, dtype=torch.bfloat16)
    graph, captured = capture(lambda: kernels.skinny_linear_w8a8(x, weight.qweight, weight.scale))
    x.copy_(torch.randn_like(x))   # new inputs, one replay
    graph.replay()
    assert torch.equal(captured, kernels.skinny_linear_w8a8(x, weight.qweight, weight.scale))
    # the model's call with a plan that chose this kernel
    launch = kernels.SKINNY_W8A8_LAUNCHES[0]
    ops = TritonOps()
    ops.fp8_skinny[(320, 1536)] = kernels.Fp8SkinnyPlan(64, {rows: ("w8a8", launch) for rows in (16, 32, 64)}, {})
    for rows in (1, 5, 33, 64):
        x = torch.randn(rows, 1536, device=DEVICE, dtype=torch.bfloat16)
        assert torch.equal(ops.linear(x, weight), kernels.skinny_linear_w8a8(x, weight.qweight, weight.scale, launch))


def check_fp8_quantize_rows() -> None:
    """Per-token activation quantization against fp8.quantize_rows (the same codes, but for a rare tie that the
    GPU's faster division rounds the other way, a step apart)."""
    from services.decoder import fp8
    from services.decoder import fp8_kernels as kernels
    for launch in launches(kernels, "QUANTIZE_LAUNCH", [(2048, 4), (256, 4)]):   # a row in one step, and in several
        for dtype, _ in DTYPES:
            x = (torch.randn(6, 1000, device=DEVICE) * torch.logspace(-4, 4, 6, device=DEVICE)[:, None]).to(dtype)
            x[2] = 0
            codes, scales = kernels.quantize_rows(x)
            want_codes, want_scales = fp8.quantize_rows(x)
            assert codes.dtype == fp8.FP8_DTYPE and scales.shape == (6, 1) and scales.dtype == torch.float32
            assert relative_error(scales, want_scales) < 1e-6, launch
            got, want = codes.float(), want_codes.float()
            assert (got != want).float().mean() < 1e-3, (launch, dtype)
            assert ((got - want).abs() <= want.abs() / 8 + 2 ** -9).all(), "more than one e4m3 step apart"
            assert not codes[2].float().any()
    assert kernels.FP8_MAX.value == fp8.FP8_MAX and kernels.MIN_AMAX.value == fp8.MIN_AMAX


def check_fp8_wide_linear() -> None:
    """W8A8: activations quantized per token, the e4m3 matmul with both scales in its epilogue; the Triton kernel
    everywhere, torch._scaled_mm (rowwise scales) on CUDA, and fp8_linear's choice of them past 16 rows."""
    from services.decoder import fp8
    from services.decoder import fp8_kernels as kernels
    for launch in launches(kernels, "FP8_MATMUL_LAUNCH", [(32, 32, 32, 2, 4, 2), (128, 128, 128, 8, 8, 4)]):
        for dtype, tolerance in DTYPES:
            # Hopper's e4m3 tensor cores sum a tile's products in fewer bits than float32's
            tolerance = max(tolerance, 1e-3) if DEVICE.type == "cuda" else tolerance
            for rows, k in ((45, 300), (130, 256)):   # partial tiles and K steps; several row tiles (grouped)
                x = torch.randn(rows, k, device=DEVICE).to(dtype)
                weight = fp8_weight(200, k)
                codes, scales = kernels.quantize_rows(x)
                out = kernels.fp8_matmul(codes, scales, weight.qweight, weight.scale, dtype)
                assert out.shape == (rows, 200) and out.dtype == dtype
                exact = (codes.float() * scales) @ weight.dequantize().T
                assert relative_error(out, exact) < tolerance, (launch, dtype, rows, k, relative_error(out, exact))
                unquantized = x.float() @ weight.dequantize().T
                assert relative_error(out, unquantized) < E4M3_ROUNDING, relative_error(out, unquantized)
    if DEVICE.type != "cuda":
        return
    x = torch.randn(40, 256, device=DEVICE, dtype=torch.bfloat16)
    weight = fp8_weight(192, 256)
    from shared.cuda_graphs import capture
    for matmul in ("scaled_mm", "triton"):
        codes, scales = kernels.quantize_rows(x)   # of this x: the replay below gives it new values
        exact = (codes.float() * scales) @ weight.dequantize().T
        out = fp8.w8a8_linear(x, weight, matmul)
        assert out.dtype == torch.bfloat16 and relative_error(out, exact) < 2e-2, (matmul, relative_error(out, exact))
        graph, captured = capture(lambda: fp8.w8a8_linear(x, weight, matmul))   # new inputs, one replay
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(captured, fp8.w8a8_linear(x, weight, matmul)), matmul
    assert torch.equal(fp8.fp8_linear(x, weight), fp8.w8a8_linear(x, weight, fp8.WIDE_MATMUL))
    assert relative_error(fp8.fp8_linear(x[:16], weight), x[:16].float() @ weight.dequantize().T) < 2e-2


def check_fp8_kv_cache_write() -> None:
    """rotary_and_cache into e4m3 caches: codes and a scale per token and KV head, as fp8.quantize_rows makes them
    from the rotated keys and the values (the kernel's sin and cos differ from PyTorch's in the last bits, so a
    code at a tie may land a step apart)."""
    from services.decoder import fp8
    from services.decoder.kernels import rotary_and_cache
    heads, kv_heads, dim, tokens = 4, 2, 16, 22
    inv_freq = 1.0 / (1e9 ** (torch.arange(0, dim, 2, device=DEVICE).float() / dim))
    positions = torch.tensor([0, 5, 9, 100, 4096, 7] + list(range(200, 216)), device=DEVICE)
    slots = torch.tensor([3, 0, 7, -1, 12, 1] + list(range(16, 30)) + [-1, 31], device=DEVICE)
    for dtype, tolerance in DTYPES:
        # heads of very different ranges: each row gets its own scale
        magnitudes = torch.logspace(-2, 2, heads + 2 * kv_heads, device=DEVICE).repeat_interleave(dim)
        qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim, device=DEVICE) * magnitudes).to(dtype)
        k_cache = torch.zeros(32, kv_heads, dim, device=DEVICE).to(fp8.FP8_DTYPE)
        v_cache = torch.zeros_like(k_cache)
        k_scales = torch.zeros(32, kv_heads, device=DEVICE)
        v_scales = torch.zeros_like(k_scales)
        q = rotary_and_cache(qkv, positions, inv_freq, k_cache, v_cache, slots, heads, kv_heads, dim, k_scales,
                             v_scales)
        q_ref, k_ref, v_ref = qkv.float().split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
        assert relative_error(q, rope_reference(q_ref.view(tokens, heads, dim), positions, inv_freq)) < tolerance
        k_rot = rope_reference(k_ref.view(tokens, kv_heads, dim), positions, inv_freq)
        for token, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            for rows, cache, scales in ((k_rot[token], k_cache, k_scales),
                                        (v_ref[token].view(kv_heads, dim), v_cache, v_scales)):
                want_codes, want_scales = fp8.quantize_rows(rows)
                assert relative_error(scales[slot], want_scales[:, 0]) < 1e-5
                got = fp8.dequantize_rows(cache[slot], scales[slot], torch.float32)
                assert relative_error(got, fp8.dequantize_rows(want_codes, want_scales[:, 0], torch.float32)) < 1e-2
                assert relative_error(got, rows) < E4M3_ROUNDING
        unwritten = [2, 4, 5, 30]
        assert not k_scales[unwritten].any() and not k_cache[unwritten].view(torch.uint8).any(), "a slot -1 row"


def fp8_kv(num_slots: int, kv_heads: int, dim: int):
    """Random keys or values as e4m3 codes [slots, Hkv, D] and scales [slots, Hkv], and their dequantized
    float32 values; the rows' ranges span four decades."""
    from services.decoder import fp8
    rows = torch.randn(num_slots, kv_heads, dim, device=DEVICE) * torch.logspace(
        -2, 2, num_slots * kv_heads, device=DEVICE)[torch.randperm(num_slots * kv_heads)].view(num_slots, kv_heads, 1)
    codes, scales = fp8.quantize_rows(rows)
    return codes, scales[..., 0].contiguous(), fp8.dequantize_rows(codes, scales[..., 0], torch.float32)


def check_fp8_paged_decode_attention() -> None:
    from services.decoder.kernels import paged_decode_attention
    torch.manual_seed(0)
    heads, kv_heads, dim, block_size, num_blocks = 8, 2, 64, 16, 40
    k_codes, k_scales, keys = fp8_kv(num_blocks * block_size, kv_heads, dim)
    v_codes, v_scales, values = fp8_kv(num_blocks * block_size, kv_heads, dim)
    contexts = [1, 17, 130, 0, 300]          # 0: a padding row
    tables = torch.zeros(len(contexts), 24, dtype=torch.int32, device=DEVICE)
    permutation = torch.randperm(num_blocks).tolist()
    for row, context in enumerate(contexts):
        need = -(-context // block_size)
        tables[row, :need] = torch.tensor([permutation.pop() for _ in range(need)], dtype=torch.int32)
    lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    for dtype, tolerance in DTYPES:
        q = torch.randn(len(contexts), heads, dim, device=DEVICE).to(dtype)
        for splits in (1, 3, 64):   # 64: the other launch shape (decode_launch)
            out = paged_decode_attention(q, k_codes, v_codes, tables, lens, dim ** -0.5, block_size, splits,
                                         k_scales, v_scales)
            assert out.dtype == dtype
            for row, context in enumerate(contexts):
                if context == 0:
                    assert not out[row].any()
                    continue
                slots = (tables[row, :, None].long() * block_size + torch.arange(block_size, device=DEVICE))
                slots = slots.flatten()[:context]
                ref = F.scaled_dot_product_attention(q[row][:, None].float(), keys[slots].transpose(0, 1),
                                                     values[slots].transpose(0, 1), scale=dim ** -0.5,
                                                     enable_gqa=True)[:, 0]
                error = relative_error(out[row], ref)
                assert error < tolerance, (dtype, splits, row, error)


def check_fp8_attention_backend() -> None:
    """AttentionBackend over an e4m3 KVCache: decode rows through the paged kernel, a later prompt chunk through
    SDPA over its gathered and dequantized context, in one step."""
    from services.decoder.attention import AttentionBackend, AttentionMetadata, KVCache, PrefillSpan
    from services.decoder.fp8 import FP8_DTYPE
    torch.manual_seed(1)
    heads, kv_heads, dim, block_size, num_blocks = 4, 2, 16, 16, 12
    for dtype, tolerance in DTYPES:
        cache = KVCache(1, num_blocks, block_size, kv_heads, dim, dtype, DEVICE, is_fp8=True)
        assert cache.keys[0].dtype == FP8_DTYPE and cache.key_scales[0].shape == (num_blocks * block_size, kv_heads)
        k_codes, k_scales, keys = fp8_kv(num_blocks * block_size, kv_heads, dim)
        v_codes, v_scales, values = fp8_kv(num_blocks * block_size, kv_heads, dim)
        cache.keys[0].copy_(k_codes)
        cache.values[0].copy_(v_codes)
        cache.key_scales[0].copy_(k_scales)
        cache.value_scales[0].copy_(v_scales)
        # two decoding sequences (contexts 20 and 33, blocks 0-1 and 2-4), then a 5-token chunk ending a
        # 37-token context (blocks 5-7)
        tables = torch.tensor([[0, 1, 0, 0], [2, 3, 4, 0]], dtype=torch.int32, device=DEVICE)
        chunk_slots = torch.arange(5 * block_size, 5 * block_size + 37, device=DEVICE)
        meta = AttentionMetadata(slot_mapping=torch.full((7,), -1, device=DEVICE), num_decode=2, block_tables=tables,
                                 context_lens=torch.tensor([20, 33], dtype=torch.int32, device=DEVICE), num_splits=2,
                                 prefills=[PrefillSpan(2, 5, 37, chunk_slots)])
        q = torch.randn(7, heads, dim, device=DEVICE).to(dtype)
        out = AttentionBackend(cache, dim ** -0.5).attend(0, q, meta)
        contexts = [torch.arange(20, device=DEVICE), torch.arange(2 * block_size, 2 * block_size + 33, device=DEVICE)]
        for row, slots in enumerate(contexts):
            ref = F.scaled_dot_product_attention(q[row][:, None].float(), keys[slots].transpose(0, 1),
                                                 values[slots].transpose(0, 1), scale=dim ** -0.5,
                                                 enable_gqa=True)[:, 0]
            assert relative_error(out[row], ref) < tolerance, (dtype, row, relative_error(out[row], ref))
        mask = torch.arange(37, device=DEVICE)[None, :] <= torch.arange(32, 37, device=DEVICE)[:, None]
        ref = F.scaled_dot_product_attention(q[2:].transpose(0, 1).float(), keys[chunk_slots].transpose(0, 1),
                                             values[chunk_slots].transpose(0, 1), attn_mask=mask, scale=dim ** -0.5,
                                             enable_gqa=True).transpose(0, 1)
        assert relative_error(out[2:], ref) < tolerance, (dtype, relative_error(out[2:], ref))


def check_fp8_cuda_graph_decode_matches_eager() -> None:
    """CUDA only: an FP8 decoder (e4m3 projections and KV cache) gives the same tokens from captured decode graphs
    as eagerly. Float32 activations, as check_cuda_graph_decode_matches_eager: bf16 cuBLAS matmuls of a padded
    graph batch may round differently from the eager batch's (check_fp8_wide_linear captures _scaled_mm)."""
    if DEVICE.type != "cuda":
        raise NotApplicable("needs CUDA")
    from services.decoder.config import DecoderConfig
    from services.decoder.factory import build_engine_for
    from services.decoder.model import TextModelSpec
    from services.decoder.weights import quantize_decoder, random_decoder
    from services.decoder.sequence import SamplingParams, Sequence

    spec = TextModelSpec(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=3, num_heads=8,
                         num_kv_heads=2, head_dim=32, rope_theta=1e9, rms_norm_eps=1e-5,
                         max_position_embeddings=4096, vision_hidden_size=32, image_token_id=10, bos_token_id=1,
                         eos_token_id=2)
    model = random_decoder(spec, torch.float32, DEVICE, seed=3)
    for param in model.parameters():
        param.data.mul_(5)
    quantize_decoder(model)
    from services.decoder.ops import TritonOps
    # Both engines take the kernels the first one measured: launches a timing picks differently sum in another
    # order, which is not what this check is about.
    measure, chosen = TritonOps.choose_linear, {}

    def choose_once(ops, weights):
        if not chosen:
            measure(ops, weights)
            chosen.update(skinny_shapes=ops.skinny_shapes, fp8_skinny=dict(ops.fp8_skinny))
        ops.skinny_shapes, ops.fp8_skinny = chosen["skinny_shapes"], dict(chosen["fp8_skinny"])

    outputs = []
    TritonOps.choose_linear = choose_once
    try:
        engines = [build_engine_for(model, DecoderConfig.load(
            ["--device", "cuda", "--kv-cache-gib", "0.05", "--max-num-seqs", "24", "--cuda-graphs", graphs,
             "--kv-cache-dtype", "fp8"]), DEVICE)[0] for graphs in ("true", "false")]
    finally:
        TritonOps.choose_linear = measure
    for engine in engines:
        # 20 sequences: decode steps of more than 16 rows (W8A8) as well as fewer (the skinny kernel)
        seqs = [Sequence(f"s{i}", [1] + [(13 * i + 7 * t) % 1000 + 14 for t in range(20 + 17 * i)], 21 + 17 * i,
                         SamplingParams(12 + i, temperature=0.7 * (i % 2), seed=i), 4096, i) for i in range(20)]
        for seq in seqs:
            engine.add(seq, lambda output: None)
        while not all(seq.is_finished for seq in seqs):
            engine.step()
        outputs.append([seq.output_token_ids for seq in seqs])
    assert outputs[0] == outputs[1], outputs


def check_gumbel_noise() -> None:
    """The sampler's one-kernel noise is top_k_top_p's: of given token ids per row, of one shared row of ids and of
    the whole vocabulary, for seeds past 32 bits (the logarithms may round a last bit apart)."""
    from services.decoder import sampling_kernels, top_k_top_p
    seed = torch.tensor([0, 4, 7919, (1 << 62) + 12345, (1 << 40) + 3])
    step = torch.tensor([0, 12, 3, 1 << 20, 7])
    ids = torch.randint(0, 1 << 17, (5, 300))
    cases = [(ids, top_k_top_p.gumbel_at(seed, step, ids)),
             (ids[:1], top_k_top_p.gumbel_at(seed, step, ids[:1])),
             (None, top_k_top_p.gumbel_at(seed, step, torch.arange(1 << 17)[None, :]))]
    for token_ids, expected in cases:
        got = sampling_kernels.gumbel_at(seed.to(DEVICE), step.to(DEVICE),
                                         None if token_ids is None else token_ids.to(DEVICE), 1 << 17)
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(cases[2][1]).all()


CHECKS = [check_add_rms_norm, check_rotary_and_cache, check_paged_decode_attention, check_silu_and_mul, check_linear,
          check_fused_engine_matches_reference_engine, check_cuda_graph_decode_matches_eager,
          check_rotate_heads, check_paired_matmuls, check_fused_vision_tower_matches_reference,
          check_prefill_chunk_attention_matches_a_mask, check_image_row_staging_keeps_rows_in_flight,
          check_vision_graphs_match_eager, check_gumbel_noise, check_prompt_chunks_attended_in_one_call]
# Run by tests/test_fp8.py; `python -m tests.kernel_checks all` runs both lists
FP8_CHECKS = [check_fp8_skinny_linear, check_fp8_skinny_w8a8, check_fp8_quantize_rows, check_fp8_wide_linear,
              check_fp8_kv_cache_write, check_fp8_paged_decode_attention, check_fp8_attention_backend,
              check_fp8_cuda_graph_decode_matches_eager]
GROUPS = {"default": CHECKS, "fp8": FP8_CHECKS, "all": CHECKS + FP8_CHECKS}


class NotApplicable(Exception):
    """The check needs hardware this run does not have (reported, neither passed nor failed)."""


def main(argv: list[str]) -> int:
    """argv: a group of GROUPS (default: "default") or check names."""
    by_name = {check.__name__: check for check in CHECKS + FP8_CHECKS}
    names = argv or ["default"]
    checks = [check for name in names for check in (GROUPS[name] if name in GROUPS else [by_name[name]])]
    failures = 0
    for check in checks:
        try:
            check()
            print(f"ok   {check.__name__}")
        except NotApplicable as why:
            print(f"n/a  {check.__name__}: {why}")
        except Exception as error:  # noqa: BLE001 - report every check
            failures += 1
            print(f"FAIL {check.__name__}: {type(error).__name__}: {error}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
