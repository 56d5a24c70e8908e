"""Builds the engine from the config: loads the weights, sizes the KV cache once, wires the engine's parts."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from services.decoder.attention import KVCache
from services.decoder.block_manager import BlockManager
from services.decoder.config import DecoderConfig
from services.decoder.engine import Engine
from services.decoder.faults import FailingRunner
from services.decoder.model import PixtralDecoder, TextModelSpec
from services.decoder.weights import load_decoder
from services.decoder.model_runner import ModelRunner
from services.decoder.scheduler import Scheduler, SchedulerConfig
from shared import fingerprints
from shared.tiny import resolve_model

log = logging.getLogger(__name__)

GIB = 1 << 30
CPU_KV_GIB = 0.25
# Activations of one forward pass, per batched token (hidden, fused qkv and gate/up, attention output), with room.
ACTIVATION_BYTES_PER_TOKEN = 256 * 1024


@dataclass(frozen=True, slots=True)
class LoadedEngine:
    engine: Engine
    spec: TextModelSpec
    fingerprint: str
    max_model_len: int


def kv_budget_bytes(config: DecoderConfig, device: torch.device) -> int:
    if config.kv_cache_gib:
        return int(config.kv_cache_gib * GIB)
    if device.type != "cuda":
        return int(CPU_KV_GIB * GIB)
    # This process may use `gpu_memory_utilization` of the GPU (weights included), within what is free: several
    # processes sharing a GPU each take their own share.
    free, total = torch.cuda.mem_get_info(device)
    reserve = GIB + config.max_num_batched_tokens * ACTIVATION_BYTES_PER_TOKEN
    own = torch.cuda.memory_reserved(device)
    return int(min(total * config.gpu_memory_utilization - own, free)) - reserve


def build_engine_for(model: PixtralDecoder, config: DecoderConfig, device: torch.device) -> tuple[Engine, int]:
    """An engine over `model` with the KV cache sized by the config; returns it and the context length."""
    spec, dtype = model.spec, model.embed_tokens.weight.dtype
    is_fp8 = config.kv_cache_dtype == "fp8"
    block_bytes = KVCache.bytes_per_block(spec.num_layers, config.block_size, spec.num_kv_heads, spec.head_dim, dtype,
                                          is_fp8)
    num_blocks = kv_budget_bytes(config, device) // block_bytes
    if num_blocks < 1:
        raise MemoryError("no memory left for the KV cache: lower --max-num-batched-tokens or free the device")
    cache = KVCache(spec.num_layers, num_blocks, config.block_size, spec.num_kv_heads, spec.head_dim, dtype, device,
                    is_fp8)
    max_model_len = min(config.max_model_len or spec.context_length, spec.context_length,
                        num_blocks * config.block_size)
    scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens),
                          BlockManager(num_blocks, config.block_size, config.enable_prefix_caching))
    log.info("KV cache: %d blocks of %d tokens, %.2f GiB, %d tokens in all; context length %d",
             num_blocks, config.block_size, cache.num_bytes / GIB, num_blocks * config.block_size, max_model_len)
    is_cuda = device.type == "cuda"
    runner = ModelRunner(model, cache, device, config.max_num_seqs, max_model_len, use_fused_kernels=is_cuda,
                         use_cuda_graphs=is_cuda and config.cuda_graphs,
                         max_step_tokens=config.max_num_batched_tokens)
    if is_cuda:
        runner.warm_up(config.max_num_batched_tokens)
    if runner.graphs is not None:
        runner.graphs.capture()
    if config.fault_forward_file:
        runner = FailingRunner(runner, config.fault_forward_file)
    engine = Engine(runner, scheduler, config.max_queued, eos_token_id=spec.eos_token_id,
                    probe_token_id=spec.bos_token_id, max_forward_failures=config.max_forward_failures,
                    overlap=is_cuda and config.async_scheduling)
    return engine, max_model_len


def build_engine(config: DecoderConfig) -> LoadedEngine:
    model_dir = resolve_model(config.model)
    device = torch.device(config.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_decoder(model_dir, dtype, device, config.quantization or None)
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    log.info("decoder weights: %.2f GiB (%s on %s%s)", weight_bytes / GIB, dtype, device,
             ", projections fp8" if config.quantization else "")
    engine, max_model_len = build_engine_for(model, config, device)
    return LoadedEngine(engine, model.spec, fingerprints.vision_fingerprint(model_dir), max_model_len)
