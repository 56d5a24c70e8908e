"""Graceful stop of a gRPC server: a grpc.aio interceptor that counts the calls in flight and, once draining, refuses
new ones with UNAVAILABLE (clients retry them on another instance).

Health is neither counted nor refused: it keeps answering NOT_SERVING while the calls in flight finish, so probes
and balancers see the instance leave, and an open health Watch does not hold the drain up.
"""

from __future__ import annotations

import grpc

from shared.auth import EXEMPT_PREFIX as HEALTH_PREFIX
from shared.errors import Unavailable
from shared.handlers import Refuse, around_call, refusing_handler
from shared.in_flight import InFlight


class DrainInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, refuse: Refuse) -> None:
        self._refuse = refuse   # (context, error, rpc): ends the call with the error's status (grpc_server.py)
        self.is_draining = False
        self.in_flight = InFlight()

    @property
    def num_in_flight(self) -> int:
        return self.in_flight.count

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no call is in flight, False if some still are after `timeout_s`."""
        return await self.in_flight.wait_idle(timeout_s)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        rpc = handler_call_details.method.rsplit("/", 1)[-1]
        if self.is_draining:
            error = Unavailable(f"{rpc}: server is shutting down; retry on another instance")
            return refusing_handler(self._refuse, error, rpc)

        async def counted(serve, request, context):
            with self.in_flight:
                return await serve()
        return around_call(handler, counted)
