"""Builds the engine from the config: loads the weights, sizes the KV cache once, wires the engine's parts."""

from __future__ import annotations

import functools
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
from services.decoder.step_budget import step_budget, time_prompt_pass_ms
from shared import fingerprints
from shared.tiny import resolve_model

log = logging.getLogger(__name__)

GIB = 1 << 30
CPU_KV_GIB = 0.25
# Activations of one forward pass, per batched token (hidden, fused qkv and gate/up, attention output), with room.
ACTIVATION_BYTES_PER_TOKEN = 256 * 1024
AUTO_TOKENS_PER_SEQ = 2560   # a 1024x768 image prompt (~2,400 tokens) and its answer
MIN_AUTO_SEQS, MAX_AUTO_SEQS = 16, 256
MIN_PREFILL_CHUNK = 256      # prompt tokens a step with decoding streams prefills whatever its time budget


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
    torch.cuda.empty_cache()   # what loading freed goes back, so that `free` counts it too
    free, total = torch.cuda.mem_get_info(device)
    reserve = GIB + config.max_num_batched_tokens * ACTIVATION_BYTES_PER_TOKEN
    return gpu_kv_budget(total, free, torch.cuda.memory_allocated(device), config.gpu_memory_utilization, reserve)


def gpu_kv_budget(total: int, free: int, held: int, utilization: float, reserve: int) -> int:
    """This process may use `utilization` of the GPU, the `held` bytes of its weights included, within what is
    `free`: several processes sharing a GPU each take their own share. `held` is what its tensors hold, not what the
    allocator has reserved (that counts blocks freed while loading, which are no weights)."""
    return int(min(total * utilization - held, free)) - reserve


def auto_max_num_seqs(num_kv_tokens: int) -> int:
    """As many sequences as the KV cache holds at the size of an image prompt and its answer, 16 to 256: more
    would mostly wait for blocks (or be preempted), fewer would leave KV memory idle. Never fewer than 16: a small
    cache still holds several short text requests at once."""
    return max(MIN_AUTO_SEQS, min(MAX_AUTO_SEQS, num_kv_tokens // AUTO_TOKENS_PER_SEQ))


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
    max_num_seqs = config.max_num_seqs or auto_max_num_seqs(num_blocks * config.block_size)
    log.info("KV cache: %d blocks of %d tokens, %.2f GiB, %d tokens in all; context length %d; %d sequences at most",
             num_blocks, config.block_size, cache.num_bytes / GIB, num_blocks * config.block_size, max_model_len,
             max_num_seqs)
    is_cuda = device.type == "cuda"
    runner = ModelRunner(model, cache, device, max_num_seqs, max_model_len, use_fused_kernels=is_cuda,
                         use_cuda_graphs=is_cuda and config.cuda_graphs,
                         max_step_tokens=config.max_num_batched_tokens)
    if is_cuda:
        runner.warm_up(config.max_num_batched_tokens)
    budget = step_budget(functools.partial(time_prompt_pass_ms, runner) if is_cuda else None,
                         config.step_time_budget_ms, config.max_num_batched_tokens,
                         min_tokens=min(MIN_PREFILL_CHUNK, config.max_num_batched_tokens))
    if runner.graphs is not None:
        runner.graphs.capture()
    if config.fault_forward_file:
        runner = FailingRunner(runner, config.fault_forward_file)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs, config.max_num_batched_tokens,
                                          budget.tokens if budget is not None else 0),
                          BlockManager(num_blocks, config.block_size, config.enable_prefix_caching))
    engine = Engine(runner, scheduler, config.max_queued, eos_token_id=spec.eos_token_id,
                    probe_token_id=spec.bos_token_id, max_forward_failures=config.max_forward_failures,
                    overlap=is_cuda and config.async_scheduling, step_budget=budget)
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
