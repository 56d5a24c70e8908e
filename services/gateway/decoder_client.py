"""One decoder worker as the gateway's pool sees it: its channel (TLS and the bearer token of the internal hop), its
health followed through grpc.health.v1, and its limits and load from its Info, read again every second or so."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pixtral.v1 import decoder_pb2, decoder_pb2_grpc
from services.gateway.decoder_messages import info_from_pb
from services.gateway.routing import DecoderLoad
from shared.generation import DecoderInfo
from shared.retries import forever

log = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 16 * 1024 * 1024),
                    ("grpc.max_send_message_length", 64 * 1024 * 1024),
                    # A restarted decoder is found again within seconds, not after gRPC's default 2-minute backoff.
                    ("grpc.initial_reconnect_backoff_ms", 500),
                    ("grpc.max_reconnect_backoff_ms", 5000)]
INFO_TIMEOUT_S = 5.0


class DecoderClient:
    """One decoder: its stub, whether it is healthy, this gateway's requests on it and its last Info."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None, metadata, server_name: str = ""):
        self.address = address
        options = list(_CHANNEL_OPTIONS)
        if server_name:  # dialled by IP, verified by name (TLS)
            options.append(("grpc.ssl_target_name_override", server_name))
        self.channel = (grpc.aio.secure_channel(address, credentials, options=options) if credentials
                        else grpc.aio.insecure_channel(address, options=options))
        self.stub = decoder_pb2_grpc.DecoderStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = metadata
        self.num_outstanding = 0
        # Until its first health answer a decoder is tried: requests fall through to another one if it is down.
        self.is_healthy = True
        self.info: DecoderInfo | None = None   # from its Info once it serves; None until then (or when it fails)
        self.num_elsewhere = 0   # its requests that are not this gateway's, at its last Info
        self._is_info_failing = False

    def set_healthy(self, is_healthy: bool, why: str) -> None:
        if is_healthy != self.is_healthy:
            log.warning("decoder %s %s (%s)", self.address, "healthy again" if is_healthy else "unhealthy: skipped",
                        why)
        self.is_healthy = is_healthy

    async def refresh_info(self) -> None:
        try:
            info = info_from_pb(await self.stub.Info(decoder_pb2.InfoRequest(), timeout=INFO_TIMEOUT_S,
                                                     metadata=self.metadata))
        except grpc.aio.AioRpcError as error:
            if not self._is_info_failing:   # said once, not at every poll
                log.warning("decoder %s: no Info (%s): its limits are unknown", self.address, error.code().name)
            self.info, self.num_elsewhere, self._is_info_failing = None, 0, True
            return
        self.info, self._is_info_failing = info, False
        # Its count holds this gateway's requests too (give or take those starting or ending just now).
        self.num_elsewhere = max(0, info.num_unfinished - self.num_outstanding)

    async def poll_info(self, interval_s: float) -> None:
        """Reads its Info every `interval_s` while it is healthy: its load and prefix-cache state, for routing, off
        the request path."""
        while True:
            await asyncio.sleep(interval_s)
            if self.is_healthy:
                await self.refresh_info()

    def load(self) -> DecoderLoad:
        return DecoderLoad(self.address, self.is_healthy, self.num_outstanding, self.num_elsewhere, self.info)

    async def watch_health(self, retry_s: float) -> None:
        """Follows the decoder's grpc.health.v1 Watch stream while it is SERVING (its Info read each time it turns
        SERVING); a broken stream counts as unhealthy until it is back.

        A decoder that is not serving is asked again every `retry_s` rather than watched: a draining decoder
        waits for the calls still open before it exits, and an open Watch would keep it waiting for its whole
        grace period."""
        @forever((grpc.aio.AioRpcError, _NotServing), first_wait_s=retry_s, max_wait_s=retry_s)
        async def watch() -> None:
            call = self.health.Watch(health_pb2.HealthCheckRequest(service=""))
            try:
                async for response in call:
                    is_serving = response.status == health_pb2.HealthCheckResponse.SERVING
                    if is_serving:
                        await self.refresh_info()
                    self.set_healthy(is_serving, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
                    if not is_serving:
                        raise _NotServing()
                self.set_healthy(False, "health stream ended")
                raise _NotServing()
            except grpc.aio.AioRpcError as error:
                self.set_healthy(False, f"health check failed: {error.code().name}")
                raise
            finally:
                call.cancel()
        await watch()


class _NotServing(Exception):
    """The decoder's health is not SERVING (or its stream ended): asked again after a while."""
