"""The vision worker process put together: the encoder (warmed up), the worker loop over the job stream, metrics.
Its gRPC server is health only: for probes and the launcher."""

from __future__ import annotations

import asyncio
import logging

import cv2
import torch

from services.vision import metrics
from services.vision.encoder import load_vision_encoder
from services.vision.worker import VisionWorker
from shared import fingerprints
from shared.images import warm_up_preprocessing
from shared.redis_client import REDIS_ERRORS
from shared.role import RoleBody, RoleContext
from shared.tiny import resolve_model
from shared.tokenizer import tokenizer_file

log = logging.getLogger(__name__)


class VisionRole(RoleBody):
    """The worker loop runs until the drain; a loop that dies on an error it cannot handle is the role's failure
    (the process exits rather than look alive and take no jobs)."""

    def __init__(self, worker: VisionWorker, stop: asyncio.Event, work: asyncio.Task, grace_extra_s: float) -> None:
        self.worker, self.stop, self.work = worker, stop, work
        self.failure = work
        self.grace_extra_s = grace_extra_s   # a blocked read of the stream ends after this

    async def drain(self, grace_s: float) -> None:
        """The batch in hand finishes (within the grace period); jobs not taken stay for the other workers."""
        self.stop.set()
        try:
            await asyncio.wait_for(self.work, timeout=grace_s + self.grace_extra_s)
            await self.worker.leave()
        except asyncio.TimeoutError:
            log.warning("job still running after the grace period; it will be reclaimed by another worker")
        except REDIS_ERRORS as error:
            log.warning("could not leave the consumer group (%s); the other workers will remove it",
                        type(error).__name__)


async def build(context: RoleContext) -> VisionRole:
    config = context.options
    if config.torch_threads:
        # Processes sharing a CPU must not oversubscribe it: torch's operators and OpenCV's resize (preprocessing).
        torch.set_num_threads(config.torch_threads)
        cv2.setNumThreads(config.torch_threads)
    model_dir = resolve_model(config.model)
    device = torch.device(config.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    encoder = await asyncio.to_thread(load_vision_encoder, model_dir, device, dtype, config.max_cuda_graphs)
    await asyncio.to_thread(encoder.warm_up)
    tokenizer_path = tokenizer_file(model_dir)
    await asyncio.to_thread(warm_up_preprocessing, tokenizer_path)
    fingerprint = await asyncio.to_thread(fingerprints.vision_fingerprint, model_dir)
    if config.fault_encode_delay_s or config.fault_encode_fail_sha256:
        log.warning("fault injection on: encode delay %.1f s, failing images %s", config.fault_encode_delay_s,
                    ",".join(config.fault_encode_fail_sha256) or "none")
    worker = VisionWorker(context.jobs_redis, encoder, fingerprint, config, on_encoded=metrics.observe_batch,
                          tokenizer_path=tokenizer_path, cache=context.cache_redis)
    metrics.register(worker, config.jobs_redis_url)
    stop = asyncio.Event()
    log.info("consumer %s, model fingerprint %s", worker.consumer, fingerprint)
    return VisionRole(worker, stop, asyncio.create_task(worker.run(stop)), config.read_block_ms / 1000)
