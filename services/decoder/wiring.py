"""The decoder process put together: the engine, image features from Redis, the service, health and metrics."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import torch

from services.decoder import metrics
from services.decoder.config import DecoderConfig
from services.decoder.engine import Engine
from services.decoder.factory import build_engine
from services.decoder.features import FeatureStore
from services.decoder.server import DecoderServicer
from services.decoder.service import DecoderService
from services.vision.config import VisionConfig
from shared.role import RoleBody, RoleContext
from shared.structured_output import FormatCompiler
from shared.tiny import resolve_model
from shared.tokenizer import load_tokenizer, tokenizer_file

if TYPE_CHECKING:
    from services.vision.colocated import ColocatedVisionWorker


class DecoderRole(RoleBody):
    """The decoder process once loaded: its engine thread runs until the drain; a device that keeps failing
    (FailurePolicy) is its failure, after which it exits for a fresh device context."""

    def __init__(self, engine: Engine, failed: asyncio.Event, vision: ColocatedVisionWorker | None) -> None:
        self.engine = engine
        self.vision = vision
        self.failure = failed.wait()

    async def drain(self, grace_s: float) -> None:
        if self.vision is not None:
            await self.vision.stop(grace_s)
        await asyncio.to_thread(self.engine.stop)


async def build(servicer: DecoderServicer, context: RoleContext) -> DecoderRole:
    config = context.options
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)  # processes sharing a CPU must not oversubscribe it
    loaded = await asyncio.to_thread(build_engine, config)
    loop, failed = asyncio.get_running_loop(), asyncio.Event()
    await context.readiness.set("engine", True)   # and NOT_SERVING from a failed forward pass until one works
    loaded.engine.failures.on_health = lambda is_healthy: asyncio.run_coroutine_threadsafe(
        context.readiness.set("engine", is_healthy), loop)
    loaded.engine.failures.on_fatal = lambda: loop.call_soon_threadsafe(failed.set)
    loaded.engine.start()
    vision = None
    if config.vision_in_process:
        # After the engine: its KV cache is sized first, and the tower's memory comes out of what the decoder leaves.
        from services.vision.colocated import ColocatedVisionWorker
        vision = ColocatedVisionWorker(colocated_vision_config(config), lambda: loop.call_soon_threadsafe(failed.set))
        await vision.start()
    metrics.register(loaded.engine, loaded.engine.admission.max_num_seqs)
    features = FeatureStore(context.cache_redis, loaded.fingerprint, loaded.spec.vision_hidden_size,
                            local_capacity_bytes=config.feature_cache_mib << 20)
    tokenizer = tokenizer_file(resolve_model(config.model))
    formats = await asyncio.to_thread(lambda: FormatCompiler(load_tokenizer(tokenizer)))
    servicer.service = DecoderService(loaded.engine, features, loaded.spec, loaded.max_model_len, loaded.fingerprint,
                                      config.enable_prefix_caching, formats, config.stream_interval)
    return DecoderRole(loaded.engine, failed, vision)


def colocated_vision_config(config: DecoderConfig) -> VisionConfig:
    """The in-process vision worker's settings: the decoder's model, device and Redis, the vision role's defaults."""
    return VisionConfig(model=config.model, device=config.device, redis=config.redis, cache_redis=config.cache_redis,
                        jobs_redis=config.jobs_redis, redis_timeout_s=config.redis_timeout_s,
                        torch_threads=config.torch_threads, log_level=config.log_level)
