"""A vision worker inside the decoder's process, for a GPU the two share (`pixtral-decoder --vision-in-process`).

Two processes on one GPU take turns on it by time slices, so a vision worker beside a decoder that is prefilling
waits behind it: its images reach the gateway late though it has little to do. In the decoder's own process the
tower runs on a CUDA stream of the highest priority, whose kernels the GPU schedules ahead of the decoder's
queued ones, so an image is encoded as soon as its job is taken.

It is the pool's worker otherwise: it takes jobs from the same stream in the same consumer group and writes the
same cache, so every decoder and the gateway see its images, and vision workers elsewhere share its jobs. It runs
on a thread with its own event loop and Redis clients, so that writing an image's features (megabytes) does not
hold the decoder's loop, which streams tokens.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable

import torch

from services.vision import metrics
from services.vision.config import VisionConfig
from services.vision.encoder import load_vision_encoder
from services.vision.worker import VisionWorker
from shared import fingerprints
from shared.images import warm_up_preprocessing
from shared.redis_client import REDIS_ERRORS, Endpoint
from shared.tiny import resolve_model
from shared.tokenizer import tokenizer_file

log = logging.getLogger(__name__)

HIGHEST_PRIORITY = -100   # torch maps it to the device's highest stream priority
# The tower's eager pass launches ~240 kernels, each taking the GIL from the engine's thread: at Python's default
# switch interval (5 ms) each such wait can last that long.
SWITCH_INTERVAL_S = 0.0002


class ColocatedVisionWorker:
    """Start with `start()` (the encoder loads and warms up, then the worker's thread runs); `stop()` lets the batch
    in hand finish. `failed` is set when the worker's loop ended on an error it cannot handle."""

    def __init__(self, config: VisionConfig, on_failure: Callable[[], None]) -> None:
        self.config = config
        self.on_failure = on_failure
        self.worker: VisionWorker | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._run, name="vision-worker", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._started.wait)
        if self._error is not None:
            raise self._error

    def _load(self) -> None:
        config = self.config
        model_dir = resolve_model(config.model)
        device = torch.device(config.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        stream = torch.cuda.Stream(device, priority=HIGHEST_PRIORITY) if device.type == "cuda" else None
        encoder = load_vision_encoder(model_dir, device, dtype, config.max_cuda_graphs, stream=stream)
        if device.type == "cuda":
            torch.cuda.synchronize(device)   # the weights were made on this thread's stream, not on `stream`
        encoder.warm_up()
        tokenizer_path = tokenizer_file(model_dir)
        warm_up_preprocessing(tokenizer_path)
        self._encoder, self._tokenizer_path = encoder, tokenizer_path
        self._fingerprint = fingerprints.vision_fingerprint(model_dir)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # noqa: BLE001 - reported to the role, which exits for a restart
            log.exception("the in-process vision worker stopped")
            self._error = error
            self._started.set()
            self.on_failure()

    async def _serve(self) -> None:
        config = self.config
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        jobs = Endpoint(config.jobs_redis_url, config.redis_timeout_s, blocking_s=config.read_block_ms / 1000)
        cache = jobs if config.cache_redis_url == config.jobs_redis_url else \
            Endpoint(config.cache_redis_url, config.redis_timeout_s)
        try:
            self.worker = VisionWorker(jobs, self._encoder, self._fingerprint, config,
                                       on_encoded=metrics.observe_batch, tokenizer_path=self._tokenizer_path,
                                       cache=cache)
            metrics.register(self.worker, config.jobs_redis_url)
            log.info("in-process vision worker: consumer %s, model fingerprint %s", self.worker.consumer,
                     self._fingerprint)
            self._started.set()
            await self.worker.run(self._stop)
            try:
                await self.worker.leave()
            except REDIS_ERRORS as error:
                log.warning("could not leave the consumer group (%s); the other workers will remove it",
                            type(error).__name__)
        finally:
            for endpoint in {id(jobs): jobs, id(cache): cache}.values():
                await endpoint.aclose()

    async def stop(self, grace_s: float) -> None:
        """The batch in hand finishes within `grace_s` (and a blocked read of the stream ends); jobs not taken stay
        for the other workers."""
        if self._thread is None or not self._thread.is_alive():
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        timeout = grace_s + self.config.read_block_ms / 1000
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            log.warning("vision job still running after the grace period; it will be reclaimed by another worker")
