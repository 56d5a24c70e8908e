"""Bootstrap of every role's grpc.aio server: health, optional reflection, TLS and bearer-token auth, error
mapping, graceful stop (drain)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from shared.auth import BearerTokenInterceptor
from shared.drain import DrainInterceptor
from shared.errors import ServiceError
from shared.logs import is_metadata_safe, request_id_var
from shared.metrics import GRPC_REQUESTS
from shared.request_parsing import ParseErrorInterceptor
from shared.rpc_errors import status_code, status_metadata
from shared.streams import write_all

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Health service name that is SERVING as long as the process runs: for liveness probes, which must not depend
# on Redis or on the model being loaded ("" and the API service names are the readiness signal).
LIVENESS_SERVICE = "liveness"
# Health service name that turns SERVING once the role has loaded what it needs (weights, tokenizer) and stays so:
# for startup probes, which cover loading and must not depend on Redis either.
STARTUP_SERVICE = "startup"

# Large enough for a request with several images of a few MB each; larger messages get RESOURCE_EXHAUSTED
# from gRPC itself before any of our code runs.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Trailing metadata of every error: the request id, so a caller can quote it (and find it in every role's logs).
REQUEST_ID_KEY = "x-request-id"


async def abort_with(context: grpc.aio.ServicerContext, error: ServiceError, rpc: str = "") -> None:
    """Ends the call with the error's status, message and rich details, the request id in the trailing metadata."""
    code = status_code(error)
    if rpc:
        GRPC_REQUESTS.labels(rpc, code.name).inc()
    request_id = request_id_var.get()
    # An id that cannot travel as metadata is left out (the gateway refuses such ids; this guards every role).
    metadata = (((REQUEST_ID_KEY, request_id),) if is_metadata_safe(request_id) else ()) + status_metadata(error)
    await context.abort(code, error.message, trailing_metadata=metadata)


def map_errors(method: Callable) -> Callable:
    """Turns ServiceError into the matching gRPC status; anything else becomes INTERNAL without details.

    Works for unary methods and for server-streaming methods written as async generators (served as coroutines
    that write each message: shared/streams.py says why). Each call ends with one log line (method, status,
    seconds), carrying the request id the method put in the log context.
    """
    name = method.__qualname__
    rpc = name.split(".")[-1]

    async def abort(context: grpc.aio.ServicerContext, error: BaseException, started: float) -> None:
        if not isinstance(error, ServiceError):
            log.exception("unexpected error in %s", name, exc_info=error)
            error = ServiceError(f"internal error in {rpc}")
        log.info("%s %s in %.3f s: %s", rpc, status_code(error).name, time.monotonic() - started, error.message)
        await abort_with(context, error, rpc)

    def finished(code: str, started: float) -> None:
        GRPC_REQUESTS.labels(rpc, code).inc()
        log.info("%s %s in %.3f s", rpc, code, time.monotonic() - started)

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            started = time.monotonic()
            try:
                await write_all(method(self, request, context), context)
                finished("OK", started)
            except asyncio.CancelledError:
                finished("CANCELLED", started)
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001 - mapped to a status, logged when unexpected
                await abort(context, error, started)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        started = time.monotonic()
        try:
            response = await method(self, request, context)
            finished("OK", started)
            return response
        except asyncio.CancelledError:
            finished("CANCELLED", started)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001
            await abort(context, error, started)
    return unary


class GrpcServer:
    """A grpc.aio server with grpc.health.v1 and, optionally, reflection, TLS and a bearer token.

    `health` answers for the overall service ("") and for each registered service name. `credentials` (from
    shared/tls.py) makes the port TLS; `auth_token` makes every call but health carry that token.
    """

    def __init__(self, address: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 options: Iterable[tuple[str, object]] = (), credentials: grpc.ServerCredentials | None = None,
                 auth_token: str = "") -> None:
        self.drainer = DrainInterceptor(abort_with)
        # Outermost first: the parse check wraps the servicers' own handlers, so a caller refused for its token or
        # by the drain is never parsed at all.
        interceptors = [self.drainer, *([BearerTokenInterceptor(auth_token, abort_with)] if auth_token else []),
                        ParseErrorInterceptor(abort_with)]
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Bound the metadata a client may send (reliability case 9: huge metadata).
            ("grpc.max_metadata_size", 64 * 1024),
            *options,
        ])
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = (self.server.add_secure_port(address, credentials) if credentials is not None
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self._service_names: list[str] = []

    def add(self, add_to_server: Callable, servicer: object, service_name: str) -> None:
        add_to_server(servicer, self.server)
        self._service_names.append(service_name)

    def enable_reflection(self) -> None:
        reflection.enable_server_reflection([*self._service_names, "grpc.health.v1.Health",
                                             reflection.SERVICE_NAME], self.server)

    async def set_serving(self, is_serving: bool) -> None:
        status = SERVING if is_serving else NOT_SERVING
        for name in ("", *self._service_names):
            await self.health.set(name, status)

    async def start(self) -> None:
        await self.set_serving(False)
        await self.health.set(STARTUP_SERVICE, NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, SERVING)
        await self.server.start()

    async def mark_started(self) -> None:
        """Loading is over: the startup probe passes (readiness goes on following Redis and the role's state)."""
        await self.health.set(STARTUP_SERVICE, SERVING)

    async def begin_drain(self) -> None:
        """NOT_SERVING at once (health keeps answering, for probes and balancers); new calls are refused."""
        await self.health.enter_graceful_shutdown()
        self.drainer.is_draining = True

    async def drain(self, grace_s: float, before_stop: Callable[[float], Awaitable[None]] | None = None) -> None:
        """Stops gracefully: NOT_SERVING and new calls refused at once, calls in flight get up to `grace_s` to
        finish (the server stops as soon as they have; what is left is cancelled). `before_stop(seconds left)`
        runs before the server stops, while health still answers."""
        give_up = time.monotonic() + grace_s
        await self.begin_drain()
        if not await self.drainer.wait_idle(grace_s):
            log.warning("%d calls still in flight after the grace period of %.0f s: cancelling them",
                        self.drainer.num_in_flight, grace_s)
        if before_stop is not None:
            await before_stop(max(0.0, give_up - time.monotonic()))
        await self.server.stop(0)

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set `stop` so the role drains instead of dying mid-stream."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
