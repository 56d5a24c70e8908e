"""The HTTP API served by uvicorn in the gateway's own event loop: a task of the gateway role, no process or thread
of its own, so that it calls the same ChatService as the gRPC servicer.

The role owns the process's signals (shared/role.py drains on SIGTERM): uvicorn must not take them over. The port
is bound here, before uvicorn starts, so that a port in use fails the start with an OSError rather than with the
SystemExit uvicorn raises from inside its task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

import uvicorn

from services.gateway.chat import ChatService
from services.gateway.config import GatewayConfig
from services.gateway.http.app import create_app
from services.gateway.http.guard import MAX_HEADER_BYTES, Guard

log = logging.getLogger(__name__)

# Seconds uvicorn gives the calls still open when it stops: the role's drain has waited for them already.
STOP_GRACE_S = 1


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Its protocol is named (IPPROTO_TCP), not left 0 as socket.create_server leaves it:
    asyncio turns Nagle's algorithm off on the connections of such sockets only, and with it on, each chunk of a
    stream after the headers waits for the client's delayed ACK (40 ms on Linux)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    def __init__(self, service: ChatService, config: GatewayConfig, *, is_ready: Callable[[], Awaitable[bool]],
                 is_draining: Callable[[], bool]) -> None:
        self.guard = Guard(create_app(service, is_ready), auth_token=config.auth_token,
                           max_body_bytes=config.max_message_bytes, is_draining=is_draining)
        self.host, self.port = config.host, config.http_port
        tls = {}
        if config.tls_cert:
            tls = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
            if config.tls_client_ca:
                tls |= {"ssl_ca_certs": config.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self.is_tls = bool(tls)
        self._server = _Server(uvicorn.Config(self.guard, http="h11", h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                                              lifespan="off", log_config=None, access_log=False,
                                              timeout_graceful_shutdown=STOP_GRACE_S, **tls))
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        sock = listen(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if self.is_tls else "http", self.host,
                 self.port)

    async def drain(self, timeout_s: float) -> None:
        """Waits up to `timeout_s` for the calls in flight (new ones are refused since the drain began)."""
        if not await self.guard.wait_idle(timeout_s):
            log.warning("%d HTTP calls still in flight after the grace period: they are cancelled",
                        self.guard.num_in_flight)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            async with asyncio.timeout(STOP_GRACE_S + 5):
                await self._task
        except TimeoutError:
            log.warning("the HTTP server did not stop in time: cancelled")
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
