"""`python -m services.vision`: one vision worker (start as many as you like)."""

from __future__ import annotations

import asyncio
import logging

import cv2
import redis.exceptions
import torch

from services.vision import metrics
from services.vision.config import VisionConfig
from services.vision.encoder import load_vision_encoder
from services.vision.worker import VisionWorker
from shared import checkpoint, redis_client, tls
from shared.grpc_server import GrpcServer, install_stop_signals
from shared.health import watch_redis
from shared.images import warm_up_preprocessing
from shared.logs import setup_logging
from shared.metrics import serve_metrics
from shared.tiny import resolve_model
from shared.tokenizer import tokenizer_file

log = logging.getLogger("services.vision")


async def serve(config: VisionConfig) -> None:
    if config.torch_threads:
        # Processes sharing a CPU must not oversubscribe it: torch's operators and OpenCV's resize (preprocessing).
        torch.set_num_threads(config.torch_threads)
        cv2.setNumThreads(config.torch_threads)
    stop = asyncio.Event()
    install_stop_signals(stop)
    # Health only: for probes and the launcher.
    server = GrpcServer(f"{config.host}:{config.port}", auth_token=config.auth_token,
                        credentials=tls.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca))
    await server.start()
    model_dir = resolve_model(config.model)
    device = torch.device(config.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    encoder = await asyncio.to_thread(load_vision_encoder, model_dir, device, dtype, config.max_cuda_graphs)
    await asyncio.to_thread(encoder.warm_up)
    tokenizer_path = tokenizer_file(model_dir)
    await asyncio.to_thread(warm_up_preprocessing, tokenizer_path)
    fingerprint = await asyncio.to_thread(checkpoint.vision_fingerprint, model_dir)
    client = redis_client.connect(config.redis, config.redis_timeout_s, blocking_s=config.read_block_ms / 1000)
    if config.fault_encode_delay_s or config.fault_encode_fail_sha256:
        log.warning("fault injection on: encode delay %.1f s, failing images %s", config.fault_encode_delay_s,
                    ",".join(config.fault_encode_fail_sha256) or "none")
    worker = VisionWorker(client, encoder, fingerprint, config, on_encoded=metrics.observe_batch,
                          tokenizer_path=tokenizer_path)
    metrics.register(worker, config.redis)
    serve_metrics(config.metrics_port)
    watcher = asyncio.create_task(watch_redis(client, server.set_serving))
    await server.mark_started()
    work = asyncio.create_task(worker.run(stop))
    log.info("ready: consumer %s, model fingerprint %s, health on port %d", worker.consumer, fingerprint,
             server.port)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([stopping, work], return_when=asyncio.FIRST_COMPLETED)
    if work.done() and not stop.is_set():
        # The loop died on an error it cannot handle: exit so the supervisor restarts this worker rather than
        # leaving a process that looks alive and takes no jobs.
        log.error("worker loop failed: %s: %s; exiting", type(work.exception()).__name__, work.exception(),
                  exc_info=work.exception())
        raise SystemExit(1)
    # NOT_SERVING at once; the job in hand finishes (bounded by the grace period); jobs not taken stay in the
    # stream for the other workers.
    await server.begin_drain()
    try:
        await asyncio.wait_for(work, timeout=config.drain_grace_s + config.read_block_ms / 1000)
        await worker.leave()
    except asyncio.TimeoutError:
        log.warning("job still running after the grace period; it will be reclaimed by another worker")
    except redis.exceptions.RedisError as error:
        log.warning("could not leave the consumer group (%s); the other workers will remove it",
                    type(error).__name__)
    watcher.cancel()
    await server.stop(1.0)
    await client.aclose()


def main() -> None:
    config = VisionConfig.load()
    setup_logging("vision", config.log_level)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
