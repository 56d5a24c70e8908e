"""`python -m services.gateway`: the public gateway."""

from __future__ import annotations

import asyncio
import logging

from pixtral.v1 import gateway_pb2_grpc
from services.gateway.chat import ChatService
from services.gateway.config import GatewayConfig
from services.gateway.decoders import DecoderPool
from services.gateway.prompt import PromptBuilder
from services.gateway.server import GatewayServicer
from services.gateway.vision_pool import VisionPool
from shared import checkpoint, redis_client, tls
from shared.grpc_server import GrpcServer, install_stop_signals
from shared.health import watch_redis
from shared.logs import setup_logging
from shared.metrics import serve_metrics
from shared.tiny import resolve_model
from shared.tokenizer import tokenizer_file
from shared.url_fetch import UrlFetcher, UrlPolicy, parse_networks

log = logging.getLogger("services.gateway")

# Pixtral-12B's context; its config's max_position_embeddings (1024000) is larger than what it was trained for.
DEFAULT_CONTEXT = 131072


async def serve(config: GatewayConfig) -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)
    server = GrpcServer(f"{config.host}:{config.port}", max_message_bytes=config.max_message_bytes,
                        credentials=tls.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca),
                        auth_token=config.auth_token)
    servicer = GatewayServicer()
    server.add(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, "pixtral.v1.Gateway")
    server.enable_reflection()
    await server.start()
    model_dir = resolve_model(config.model)
    model_config = await asyncio.to_thread(checkpoint.load_config, model_dir)
    fingerprint = await asyncio.to_thread(checkpoint.vision_fingerprint, model_dir)
    max_model_len = config.max_model_len or min(DEFAULT_CONTEXT, model_config.text_config.max_position_embeddings)
    builder = await asyncio.to_thread(PromptBuilder, config.max_image_pixels, tokenizer_file(model_dir))
    client = redis_client.connect(config.redis, config.redis_timeout_s)
    pool = VisionPool(client, fingerprint, config.lock_ttl_s, embedding_ttl_s=config.embedding_ttl_s)
    await pool.start()
    decoders = DecoderPool(
        config.decoder_addresses,
        tls.channel_credentials(config.decoder_tls_ca, config.decoder_tls_cert, config.decoder_tls_key),
        config.decoder_token, config.health_check_interval_s)
    await decoders.start()
    servicer.service = ChatService(config, builder, pool, decoders, max_model_len, url_fetcher(config))
    serve_metrics(config.metrics_port)
    watcher = asyncio.create_task(watch_redis(client, server.set_serving))
    await server.mark_started()
    log.info("ready on port %d (model fingerprint %s, context %d, decoders %s)", server.port, fingerprint,
             max_model_len, ",".join(config.decoder_addresses))
    await stop.wait()
    log.info("draining for up to %.0f s", config.drain_grace_s)
    watcher.cancel()
    await server.drain(config.drain_grace_s)
    await pool.close()
    await decoders.close()
    await client.aclose()


def url_fetcher(config: GatewayConfig) -> UrlFetcher | None:
    """None without an allow-list: then only data: URLs are accepted."""
    if not config.image_url_allowlist:
        return None
    return UrlFetcher(UrlPolicy(
        allowed_hosts=frozenset(host.lower().rstrip(".") for host in config.image_url_allowlist),
        allowed_networks=parse_networks(config.image_url_allowed_networks), max_bytes=config.max_image_bytes,
        timeout_s=config.image_url_timeout_s, max_redirects=config.image_url_max_redirects))


def main() -> None:
    config = GatewayConfig.load()
    setup_logging("gateway", config.log_level)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
