"""The decoder process put together: the engine, image features from Redis, the service, health and metrics."""

from __future__ import annotations

import asyncio
import sys

import torch

from services.decoder import metrics
from services.decoder.engine import Engine
from services.decoder.factory import build_engine
from services.decoder.features import FeatureStore
from services.decoder.server import DecoderServicer
from services.decoder.service import DecoderService
from shared.role import RoleBody, RoleContext
from shared.structured_output import FormatCompiler
from shared.tiny import resolve_model
from shared.tokenizer import load_tokenizer, tokenizer_file


class DecoderRole(RoleBody):
    """The decoder process once loaded: its engine thread runs until the drain; a device that keeps failing
    (FailurePolicy) is its failure, after which it exits for a fresh device context."""

    def __init__(self, engine: Engine, failed: asyncio.Event) -> None:
        self.engine = engine
        self.failure = failed.wait()

    async def drain(self, grace_s: float) -> None:
        await asyncio.to_thread(self.engine.stop)


async def build(servicer: DecoderServicer, context: RoleContext) -> DecoderRole:
    config = context.options
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)  # processes sharing a CPU must not oversubscribe it
    if config.switch_interval_ms:
        sys.setswitchinterval(config.switch_interval_ms / 1000)
    loaded = await asyncio.to_thread(build_engine, config)
    loop, failed = asyncio.get_running_loop(), asyncio.Event()
    await context.readiness.set("engine", True)   # and NOT_SERVING from a failed forward pass until one works
    loaded.engine.failures.on_health = lambda is_healthy: asyncio.run_coroutine_threadsafe(
        context.readiness.set("engine", is_healthy), loop)
    loaded.engine.failures.on_fatal = lambda: loop.call_soon_threadsafe(failed.set)
    loaded.engine.start()
    metrics.register(loaded.engine, loaded.engine.admission.max_num_seqs)
    features = FeatureStore(context.cache_redis, loaded.fingerprint, loaded.spec.vision_hidden_size,
                            local_capacity_bytes=config.feature_cache_mib << 20)
    tokenizer = tokenizer_file(resolve_model(config.model))
    formats = await asyncio.to_thread(lambda: FormatCompiler(load_tokenizer(tokenizer)))
    servicer.service = DecoderService(loaded.engine, features, loaded.spec, loaded.max_model_len, loaded.fingerprint,
                                      config.enable_prefix_caching, formats, config.stream_interval)
    return DecoderRole(loaded.engine, failed)
