"""Bearer-token authentication: a grpc.aio server interceptor every role's server uses, and the client's header.

With a token configured, every call but grpc.health.v1 must carry the metadata `authorization: Bearer <token>`
(the scheme in any case, RFC 6750); reflection and unknown methods included, so a caller without the token learns
nothing about the API. Health is exempt because Kubernetes' gRPC probes cannot send headers. The token is compared
in constant time, and a refused call is ended before its request is read.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence

import grpc

from shared.errors import Unauthenticated
from shared.handlers import Refuse, refusing_handler

log = logging.getLogger(__name__)

HEADER = "authorization"
SCHEME = "bearer"
EXEMPT_PREFIX = "/grpc.health.v1.Health/"


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata a client sends; empty without a token."""
    return ((HEADER, f"Bearer {token}"),) if token else ()


def canonical(value: str | bytes) -> bytes | None:
    """An `authorization` value with its scheme written `Bearer` (RFC 6750: the scheme's case does not matter), or
    None when it is not the Bearer scheme."""
    raw = value if isinstance(value, bytes) else value.encode()
    scheme, _, token = raw.partition(b" ")
    return b"Bearer " + token if scheme.lower() == SCHEME.encode() else None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, refuse: Refuse) -> None:
        if not token:
            raise ValueError("an empty token would let every caller in")
        self._expected = f"Bearer {token}".encode()
        self._refuse = refuse   # (context, error, rpc): ends the call with the error's status (grpc_server.py)

    def is_authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        presented = [value for key, value in metadata or () if key == HEADER]
        if len(presented) != 1:
            return False  # none, or several: refuse rather than guess which one a proxy meant
        value = canonical(presented[0])
        return value is not None and hmac.compare_digest(value, self._expected)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(EXEMPT_PREFIX) or self.is_authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        log.warning("refused %s: missing or invalid bearer token", method)
        handler = await continuation(handler_call_details)
        # An unknown method's name comes from the caller: it must not become a metric label of its own.
        rpc = method.rsplit("/", 1)[-1] if handler is not None else "unknown"
        error = Unauthenticated(f"{rpc}: missing or invalid bearer token (metadata 'authorization: Bearer <token>')")
        return refusing_handler(self._refuse, error, rpc)
