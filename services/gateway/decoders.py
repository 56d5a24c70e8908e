"""The gateway's client of the decoder workers: routing (the policy is routing.py's), retry on another decoder before
the first token, and error mapping. Each decoder's channel, health and Info: decoder_client.py; the messages:
decoder_messages.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import grpc

from pixtral.v1 import common_pb2, decoder_pb2
from services.gateway import metrics
from services.gateway.decoder_client import DecoderClient
from services.gateway.decoder_messages import DecodeOutput, output_from_pb, request_to_pb
from services.gateway.routing import DEFAULT_LOAD_FACTOR, DEFAULT_LOAD_SLACK, affinity_key, policy
from shared.auth import bearer_metadata
from shared.errors import ServiceError, Unavailable
from shared.generation import DecoderInfo, GenerateRequest
from shared.retries import attempts
from shared.rpc_errors import domain_error

log = logging.getLogger(__name__)

# How long a stream's status may take after the decoder's last message before the call is let go anyway.
STATUS_WAIT_S = 1.0


class _FailedBeforeOutput(Exception):
    """A decoder that could not start the request: the next one is tried."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(error.message)
        self.error = error


class DecoderPool:
    """Sends each request to the decoder its routing policy ranks first (routing.py: `affinity`, the decoder whose
    prefix cache holds prompts that start alike unless it is overloaded, or `least-busy`), the next ones if it
    fails before its first token. Each decoder's load is this gateway's requests in flight on it, exact, plus the
    others' from its Info, read every `info_interval_s`.

    When no decoder is healthy, all of them are tried anyway: health answers lag behind (a decoder back from a
    Redis outage is seen within `health_retry_s`), and a decoder that cannot serve answers UNAVAILABLE at once.

    An address `dns:///name:port` (e.g. a Kubernetes headless Service) stands for every address the name resolves
    to, looked up again every `discovery_interval_s`: each decoder pod gets its own channel, so balancing is per
    request and per pod (one channel to the name would stick to a single pod until its connection breaks).
    """

    def __init__(self, addresses: tuple[str, ...], credentials: grpc.ChannelCredentials | None = None,
                 token: str = "", health_retry_s: float = 1.0, discovery_interval_s: float = 10.0,
                 routing: str = "affinity", load_factor: float = DEFAULT_LOAD_FACTOR,
                 load_slack: int = DEFAULT_LOAD_SLACK, info_interval_s: float = 1.0) -> None:
        self.credentials = credentials
        self.metadata = bearer_metadata(token)
        self.names = [address.removeprefix("dns:///") for address in addresses if address.startswith("dns:///")]
        self.decoders = [DecoderClient(address, credentials, self.metadata) for address in addresses
                         if not address.startswith("dns:///")]
        self._static_addresses = {decoder.address for decoder in self.decoders}
        self.health_retry_s = health_retry_s
        self.discovery_interval_s = discovery_interval_s
        self.policy = policy(routing, load_factor, load_slack)
        self.info_interval_s = info_interval_s
        self._watchers: dict[str, asyncio.Task] = {}
        self._pollers: dict[str, asyncio.Task] = {}
        self._discovery: asyncio.Task | None = None

    async def start(self) -> None:
        for decoder in self.decoders:
            self._watch(decoder)
        if self.names:
            await self.discover()
            self._discovery = asyncio.create_task(self._discover_forever())

    def _watch(self, decoder: DecoderClient) -> None:
        self._watchers[decoder.address] = asyncio.create_task(decoder.watch_health(self.health_retry_s))
        self._pollers[decoder.address] = asyncio.create_task(decoder.poll_info(self.info_interval_s))

    def infos(self) -> list[DecoderInfo]:
        """The Info of every healthy decoder that gave one."""
        return [decoder.info for decoder in self.decoders if decoder.is_healthy and decoder.info is not None]

    async def are_all_at_capacity(self) -> bool:
        """Every healthy decoder would refuse a request now, by this gateway's requests on it (exact) and the
        others' at its last Info. False when none is healthy or one's limits are unknown: then the decoders say.

        The others' count is up to `info_interval_s` old (and may still hold a request of this gateway's that
        ended just after that Info), so the decoders it takes part in filling are asked again before a refusal."""
        if not self._are_all_at_capacity():
            return False
        stale = [decoder for decoder in self.decoders if decoder.is_healthy and decoder.num_elsewhere > 0]
        if not stale:
            return True
        await asyncio.gather(*(decoder.refresh_info() for decoder in stale))
        return self._are_all_at_capacity()

    def _are_all_at_capacity(self) -> bool:
        loads = [decoder.load() for decoder in self.decoders if decoder.is_healthy]
        return bool(loads) and all(load.is_at_capacity for load in loads)

    def context_length(self) -> int | None:
        """The smallest context of the healthy decoders (None while none has given its Info)."""
        return min((info.max_model_len for info in self.infos()), default=None)

    async def discover(self) -> None:
        """Adds a decoder per newly resolved address and retires those no longer resolved."""
        loop = asyncio.get_running_loop()
        resolved: dict[str, str] = {}
        for name in self.names:
            host, _, port = name.rpartition(":")
            try:
                infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except OSError as error:
                log.warning("cannot resolve decoders %s: %s", name, error)
                return  # keep what we have rather than drop every decoder on a DNS hiccup
            for *_, sockaddr in infos:
                ip = sockaddr[0]
                resolved[f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"] = host
        known = {decoder.address for decoder in self.decoders}
        for address, host in resolved.items():
            if address not in known:
                log.info("decoder %s found", address)
                decoder = DecoderClient(address, self.credentials, self.metadata,
                                   server_name=host if self.credentials else "")
                self.decoders.append(decoder)
                self._watch(decoder)
        for decoder in [d for d in self.decoders if d.address not in resolved
                        and d.address not in self._static_addresses]:
            log.info("decoder %s gone", decoder.address)
            self.decoders.remove(decoder)
            self._watchers.pop(decoder.address).cancel()
            self._pollers.pop(decoder.address).cancel()
            asyncio.create_task(self._close_when_idle(decoder))

    async def _close_when_idle(self, decoder: DecoderClient) -> None:
        while decoder.num_outstanding:
            await asyncio.sleep(1.0)
        await decoder.channel.close()

    async def _discover_forever(self) -> None:
        while True:
            await asyncio.sleep(self.discovery_interval_s)
            await self.discover()

    def _ranked(self, request: GenerateRequest) -> list[DecoderClient]:
        ranking = self.policy.rank(affinity_key(request), [decoder.load() for decoder in self.decoders])
        if ranking.addresses:
            metrics.DECODER_CHOICES.labels(ranking.reason).inc()
        by_address = {decoder.address: decoder for decoder in self.decoders}
        return [by_address[address] for address in ranking.addresses]

    async def _open(self, decoder: DecoderClient, message: decoder_pb2.GenerateRequest, timeout_s: float | None):
        """Starts the call on `decoder` up to its first message -> (call, first response); a decoder that is
        UNAVAILABLE or full (RESOURCE_EXHAUSTED: its admission refused the request before doing anything), or that
        fails before sending anything, raises _FailedBeforeOutput (the next one is tried)."""
        call = decoder.stub.Generate(message, timeout=timeout_s, metadata=self.metadata)
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            call.cancel()
            mapped = domain_error(error, "decoder")
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                log.warning("decoder %s unavailable; trying another", decoder.address)
                raise _FailedBeforeOutput(mapped) from None
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:   # what its last Info said is out of date
                log.info("decoder %s full; trying another", decoder.address)
                raise _FailedBeforeOutput(mapped) from None
            raise mapped from None
        if first is grpc.aio.EOF or first.finish_reason == common_pb2.FINISH_REASON_ERROR:
            call.cancel()
            log.warning("decoder %s failed before the first token; trying another", decoder.address)
            raise _FailedBeforeOutput(Unavailable("decoder failed during generation"))
        return call, first

    async def generate(self, request: GenerateRequest, timeout_s: float | None) -> AsyncIterator[DecodeOutput]:
        """Streams the decoder's outputs. A decoder that is UNAVAILABLE or full before sending anything is skipped
        (tried on the next one: nothing happened yet, so the call is safe to repeat); when every one is, the last
        one's error is raised.

        A decoder whose forward pass failed sends finish_reason ERROR, then ends the call UNAVAILABLE: that is
        raised as Unavailable (the caller ends its stream with an error), or, before any token, retried elsewhere.
        """
        message, ranked = request_to_pb(request), self._ranked(request)
        if not ranked:
            raise Unavailable("no decoder available")
        try:
            async for attempt in attempts(len(ranked), (_FailedBeforeOutput,)):
                with attempt:
                    decoder = ranked[attempt.retry_state.attempt_number - 1]
                    decoder.num_outstanding += 1
                    try:
                        call, response = await self._open(decoder, message, timeout_s)
                    except BaseException:
                        decoder.num_outstanding -= 1
                        raise
        except _FailedBeforeOutput as failure:
            raise failure.error from None
        num_unfinished = request.n
        try:
            while response is not grpc.aio.EOF:
                if response.finish_reason == common_pb2.FINISH_REASON_ERROR:
                    raise Unavailable("decoder failed during generation")
                output = output_from_pb(response)
                num_unfinished -= output.finish_reason is not None
                if num_unfinished == 0:
                    # The decoder's last message: its status follows at once. Wait for it (briefly) before the
                    # caller may leave, as leaving cancels the call and the cancel would race that status.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(STATUS_WAIT_S):
                            await call.code()
                    yield output
                    return
                yield output
                response = await call.read()
        except grpc.aio.AioRpcError as error:
            raise domain_error(error, "decoder") from None
        finally:
            decoder.num_outstanding -= 1
            call.cancel()  # no-op when finished; frees the decoder's slot when our caller went away

    async def close(self) -> None:
        if self._discovery:
            self._discovery.cancel()
        for task in [*self._watchers.values(), *self._pollers.values()]:
            task.cancel()
        for decoder in self.decoders:
            await decoder.channel.close()
