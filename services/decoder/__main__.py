"""`python -m services.decoder`: one decoder worker."""

from __future__ import annotations

import asyncio
import functools
import logging

import torch

from pixtral.v1 import decoder_pb2_grpc
from services.decoder.config import DecoderConfig
from services.decoder.factory import build_engine
from services.decoder import metrics
from services.decoder.features import FeatureStore
from services.decoder.server import DecoderServicer
from services.decoder.service import DecoderService
from shared import redis_client, tls
from shared.grpc_server import GrpcServer, install_stop_signals
from shared.health import Readiness, watch_redis
from shared.logs import setup_logging
from shared.metrics import serve_metrics

log = logging.getLogger("services.decoder")


async def serve(config: DecoderConfig) -> None:
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)  # processes sharing a CPU must not oversubscribe it
    stop = asyncio.Event()
    install_stop_signals(stop)
    server = GrpcServer(f"{config.host}:{config.port}", auth_token=config.auth_token,
                        credentials=tls.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca))
    servicer = DecoderServicer()
    server.add(decoder_pb2_grpc.add_DecoderServicer_to_server, servicer, "pixtral.v1.Decoder")
    await server.start()
    log.info("listening on port %d; loading %s", server.port, config.model)
    loaded = await asyncio.to_thread(build_engine, config)
    # Ready while Redis answers and the engine's forward passes work.
    readiness = Readiness(server.set_serving)
    await readiness.set("redis", False)   # until its watcher's first PING answers
    await readiness.set("engine", True)
    loop = asyncio.get_running_loop()
    failed = asyncio.Event()
    loaded.engine.on_health = lambda is_healthy: asyncio.run_coroutine_threadsafe(
        readiness.set("engine", is_healthy), loop)
    loaded.engine.on_fatal = lambda: loop.call_soon_threadsafe(failed.set)
    loaded.engine.start()
    metrics.register(loaded.engine, config.max_num_seqs)
    serve_metrics(config.metrics_port)
    client = redis_client.connect(config.redis, config.redis_timeout_s)
    features = FeatureStore(client, loaded.fingerprint, loaded.spec.vision_hidden_size,
                            local_capacity_bytes=config.feature_cache_mib << 20)
    servicer.service = DecoderService(loaded.engine, features, loaded.spec, loaded.max_model_len)
    watcher = asyncio.create_task(watch_redis(client, functools.partial(readiness.set, "redis")))
    await server.mark_started()
    log.info("ready on port %d", server.port)
    stopping, failing = asyncio.create_task(stop.wait()), asyncio.create_task(failed.wait())
    await asyncio.wait([stopping, failing], return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if failed.is_set():
        # Its streams have ended with an error: exit, so the supervisor starts a decoder on a fresh device context.
        log.error("engine stopped after %d failed forward passes in a row; exiting", config.max_forward_failures)
        await server.drain(1.0)
        await client.aclose()
        raise SystemExit(1)
    log.info("draining for up to %.0f s", config.drain_grace_s)
    await server.drain(config.drain_grace_s)
    loaded.engine.stop()
    await client.aclose()


def main() -> None:
    config = DecoderConfig.load()
    setup_logging("decoder", config.log_level)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
