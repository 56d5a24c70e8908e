"""`python -m services.decoder`: one decoder worker."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
import torch

from pixtral.v1 import decoder_pb2_grpc
from services.decoder.config import DecoderConfig
from services.decoder.factory import build_engine
from services.decoder import metrics
from services.decoder.features import FeatureStore
from services.decoder.server import DecoderServicer
from services.decoder.service import DecoderService
from shared import tls
from shared.grpc_server import GrpcServer, install_stop_signals
from shared.health import watch_redis
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
    loaded.engine.start()
    metrics.register(loaded.engine, config.max_num_seqs)
    serve_metrics(config.metrics_port)
    client = aioredis.from_url(config.redis)
    features = FeatureStore(client, loaded.fingerprint, loaded.spec.vision_hidden_size,
                            local_capacity_bytes=config.feature_cache_mib << 20,
                            pin_memory=config.device == "cuda")
    servicer.service = DecoderService(loaded.engine, features, loaded.spec, loaded.max_model_len)
    watcher = asyncio.create_task(watch_redis(client, server.set_serving))
    log.info("ready on port %d", server.port)
    await stop.wait()
    log.info("draining for up to %.0f s", config.drain_grace_s)
    watcher.cancel()
    await server.stop(config.drain_grace_s)
    loaded.engine.stop()
    await client.aclose()


def main() -> None:
    config = DecoderConfig.load()
    setup_logging("decoder", config.log_level)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
