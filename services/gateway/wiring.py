"""The gateway process put together: its model's facts, the vision pool, the decoders, the request route, and the
HTTP API beside the gRPC one (with --http-port)."""

from __future__ import annotations

import asyncio
import functools

from grpc_health.v1 import health_pb2

from services.gateway.chat import ChatService
from services.gateway.config import GatewayConfig
from services.gateway.decoders import DecoderPool
from services.gateway.http.server import HttpServer
from services.gateway.images import ImageResolver
from services.gateway.prompt import PromptBuilder
from services.gateway.route import Route
from services.gateway.server import GatewayServicer
from services.gateway.vision_pool import VisionPool
from shared import checkpoint, fingerprints, tls
from shared.grpc_server import GrpcServer
from shared.role import RoleBody, RoleContext
from shared.structured_output import FormatCompiler
from shared.tiny import resolve_model
from shared.tokenizer import tokenizer_file
from shared.url_fetch import UrlFetcher, UrlPolicy, parse_networks


class GatewayRole(RoleBody):
    def __init__(self, pool: VisionPool, decoders: DecoderPool, http: HttpServer | None = None) -> None:
        self.pool, self.decoders, self.http = pool, decoders, http

    async def drain(self, grace_s: float) -> None:
        if self.http is not None:
            await self.http.drain(grace_s)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.stop()
        await self.pool.close()
        await self.decoders.close()


async def build(servicer: GatewayServicer, context: RoleContext) -> GatewayRole:
    config = context.options
    model_dir = resolve_model(config.model)
    model_config = await asyncio.to_thread(checkpoint.load_config, model_dir)
    fingerprint = await asyncio.to_thread(fingerprints.vision_fingerprint, model_dir)
    builder = await asyncio.to_thread(PromptBuilder, tokenizer_file(model_dir))
    pool = VisionPool(context.jobs_redis, fingerprint, config.lock_ttl_s, embedding_ttl_s=config.embedding_ttl_s,
                      cache=context.cache_redis)
    await pool.start()
    decoders = DecoderPool(
        config.decoder_addresses,
        tls.channel_credentials(config.decoder_tls_ca, config.decoder_tls_cert, config.decoder_tls_key),
        config.decoder_token, config.health_check_interval_s, routing=config.routing,
        load_factor=config.routing_load_factor, load_slack=config.routing_load_slack,
        info_interval_s=config.decoder_info_interval_s)
    await decoders.start()
    resolver = ImageResolver(config.max_image_bytes, config.max_image_pixels, url_fetcher(config))
    model_context = min(config.max_model_len or checkpoint.context_length(model_config),
                        checkpoint.context_length(model_config))
    formats = await asyncio.to_thread(lambda: FormatCompiler(builder.tokenizer))
    route = Route(config, builder, resolver, pool, decoders, model_context, formats)
    model_name = config.model_name or ("tiny" if config.model == "tiny" else model_dir.name)
    servicer.service = service = ChatService(route, model_name, fingerprint)
    http = None
    if config.http_port:
        http = HttpServer(service, config, is_ready=functools.partial(is_serving, context.server),
                          is_draining=lambda: context.server.drainer.is_draining)
        await http.start()
    return GatewayRole(pool, decoders, http)


async def is_serving(server: GrpcServer) -> bool:
    """The gateway's readiness, as its gRPC health answers it (the overall service, "", which always exists)."""
    response = await server.health.Check(health_pb2.HealthCheckRequest(service=""), None)
    return response.status == health_pb2.HealthCheckResponse.SERVING


def url_fetcher(config: GatewayConfig) -> UrlFetcher | None:
    """None without an allow-list: then only data: URLs are accepted."""
    if not config.image_url_allowlist:
        return None
    return UrlFetcher(UrlPolicy(
        allowed_hosts=frozenset(host.lower().rstrip(".") for host in config.image_url_allowlist),
        allowed_networks=parse_networks(config.image_url_allowed_networks), max_bytes=config.max_image_bytes,
        timeout_s=config.image_url_timeout_s, max_redirects=config.image_url_max_redirects))
