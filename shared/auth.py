"""Bearer-token authentication: a grpc.aio server interceptor every role's server uses, and the client's header.

With a token configured, every call but grpc.health.v1 must carry the metadata `authorization: Bearer <token>`;
reflection and unknown methods included, so a caller without the token learns nothing about the API. Health is
exempt because Kubernetes' gRPC probes cannot send headers. The token is compared in constant time.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc

from shared.errors import Unauthenticated

log = logging.getLogger(__name__)

HEADER = "authorization"
EXEMPT_PREFIX = "/grpc.health.v1.Health/"

_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata a client sends; empty without a token."""
    return ((HEADER, f"Bearer {token}"),) if token else ()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str,
                 refuse: Callable[[grpc.aio.ServicerContext, Unauthenticated, str], Awaitable[None]]) -> None:
        if not token:
            raise ValueError("an empty token would let every caller in")
        self._expected = f"Bearer {token}".encode()
        self._refuse = refuse   # (context, error, rpc): ends the call with the error's status (grpc_server.py)

    def is_authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        presented = [value for key, value in metadata or () if key == HEADER]
        if len(presented) != 1:
            return False  # none, or several: refuse rather than guess which one a proxy meant
        value = presented[0] if isinstance(presented[0], bytes) else presented[0].encode()
        return hmac.compare_digest(value, self._expected)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(EXEMPT_PREFIX) or self.is_authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        log.warning("refused %s: missing or invalid bearer token", method)
        handler = await continuation(handler_call_details)
        # An unknown method's name comes from the caller: it must not become a metric label of its own.
        return self._refusing(handler, method.rsplit("/", 1)[-1] if handler is not None else "unknown")

    def _refusing(self, handler: grpc.RpcMethodHandler | None, rpc: str) -> grpc.RpcMethodHandler:
        """A handler of the same kind as the method's (or a unary one for unknown methods) that only refuses."""
        error = Unauthenticated(f"{rpc}: missing or invalid bearer token (metadata 'authorization: Bearer <token>')")

        async def refuse(request_or_iterator, context):
            await self._refuse(context, error, rpc)

        if handler is None:
            return grpc.unary_unary_rpc_method_handler(refuse)
        make = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
        return make(refuse, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
