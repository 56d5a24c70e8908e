"""What every role's process does the same way: its common options, and `run_role`, which runs a role from start to
stop: logs, signals, the gRPC server with health (and reflection), the Redis client and readiness, metrics, and the
drain on SIGTERM. A role's __main__ gives it the role's options and a `build` coroutine that loads the role.

Readiness ("" health) is SERVING while Redis answers and every condition the role adds holds; `startup` turns
SERVING once `build` returned; `liveness` is SERVING while the process runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from shared import redis_client, tls
from shared.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, GrpcServer, install_stop_signals
from shared.health import Readiness, watch_redis
from shared.logs import setup_logging
from shared.metrics import serve_metrics, watch_event_loop
from shared.settings import load_config, option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoleOptions:
    """Options of every role (each role's config adds its own and its own port defaults)."""

    model: str = option("tiny", "checkpoint directory (Hugging Face or Mistral layout), or 'tiny' for the built-in "
                                "tiny model")
    redis: str = option("redis://127.0.0.1:6379/0", "Redis URL of the embedding cache and the job stream")
    host: str = option("0.0.0.0", "address the gRPC server and the metrics endpoint listen on")
    port: int = option(0, "gRPC port")
    metrics_port: int = option(0, "port of the Prometheus /metrics endpoint; 0: none")
    redis_timeout_s: float = option(5.0, "time limit of one Redis command; a Redis that takes longer is unavailable")
    drain_grace_s: float = option(30.0, "on SIGTERM, seconds the work in flight may take to finish")
    log_level: str = option("info", "log level")
    auth_token: str = option("", "bearer token every call but health must carry ('authorization: Bearer <token>'); "
                                 "prefer the environment to the flag, which process lists show; empty: none",
                             secret=True)
    tls_cert: str = option("", "PEM certificate (chain) of the gRPC port; with --tls-key: serve TLS")
    tls_key: str = option("", "PEM private key of --tls-cert")
    tls_client_ca: str = option("", "PEM CA that must have signed client certificates (mutual TLS)")

    def __post_init__(self) -> None:
        tls.check_server_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        if self.redis_timeout_s <= 0 or self.drain_grace_s < 0:
            raise ValueError("--redis-timeout-s must be positive and --drain-grace-s not negative")

    @classmethod
    def load(cls, argv: Sequence[str] | None = None):
        return load_config(cls, argv)


@dataclass(frozen=True)
class ModelRoleOptions(RoleOptions):
    """Options of the roles that run a model (decoder, vision)."""

    device: str = option("cpu", "cpu or cuda")
    torch_threads: int = option(0, "CPU threads of torch's operators; 0: torch's default (all cores)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.torch_threads < 0:
            raise ValueError("--torch-threads must not be negative")


@dataclass(frozen=True, slots=True)
class Service:
    """A gRPC service the role serves: its add_*_to_server function, its servicer, its full name."""

    add_to_server: Callable
    servicer: object
    name: str


@dataclass(frozen=True, slots=True)
class RoleContext:
    """What a role's build gets: its options, the server (already answering health), readiness, Redis."""

    options: RoleOptions
    server: GrpcServer
    readiness: Readiness
    redis: aioredis.Redis


class RoleBody:
    """What build returns: the loaded role. `failure`, when set, is awaited beside the stop signal: a role whose
    work ended on its own cannot go on, and the process exits 1 for its supervisor to restart it."""

    failure: Awaitable | None = None

    async def drain(self, grace_s: float) -> None:
        """The work in hand finishes (new calls are refused by then, the calls in flight are over)."""

    async def close(self) -> None:
        """Releases what build made."""


Build = Callable[[RoleContext], Awaitable[RoleBody]]


def run_role(name: str, options: RoleOptions, build: Build, *, services: Sequence[Service] = (),
             reflection: bool = False, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
             redis_blocking_s: float = 0.0) -> None:
    """Runs the role until SIGTERM/SIGINT (drained) or its failure (exit status 1)."""
    setup_logging(name, options.log_level)
    asyncio.run(_serve(options, build, services, reflection, max_message_bytes, redis_blocking_s))


async def _serve(options: RoleOptions, build: Build, services: Sequence[Service], reflection: bool,
                 max_message_bytes: int, redis_blocking_s: float) -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)
    server = GrpcServer(f"{options.host}:{options.port}", max_message_bytes=max_message_bytes,
                        credentials=tls.server_credentials(options.tls_cert, options.tls_key, options.tls_client_ca),
                        auth_token=options.auth_token)
    for service in services:
        server.add(service.add_to_server, service.servicer, service.name)
    if reflection:
        server.enable_reflection()
    await server.start()
    log.info("listening on port %d; loading %s", server.port, options.model)
    readiness = Readiness(server.set_serving)
    await readiness.set("redis", False)   # until its watcher's first PING answers
    client = redis_client.connect(options.redis, options.redis_timeout_s, blocking_s=redis_blocking_s)
    body = await build(RoleContext(options, server, readiness, client))
    serve_metrics(options.metrics_port, options.host)
    watchers = [asyncio.create_task(watch_redis(client, functools.partial(readiness.set, "redis"))),
                asyncio.create_task(watch_event_loop())]
    await server.mark_started()
    log.info("ready on port %d", server.port)
    stopping = asyncio.create_task(stop.wait())
    failure = asyncio.ensure_future(body.failure) if body.failure is not None else None
    await asyncio.wait([stopping] + ([failure] if failure else []), return_when=asyncio.FIRST_COMPLETED)
    for watcher in watchers:
        watcher.cancel()
    try:
        if not stop.is_set():
            error = failure.exception()
            log.error("the role cannot go on (%s); exiting for its supervisor to restart it",
                      f"{type(error).__name__}: {error}" if error else "it stopped", exc_info=error)
            await server.drain(1.0)
            raise SystemExit(1)
        log.info("draining for up to %.0f s", options.drain_grace_s)
        await server.drain(options.drain_grace_s, before_stop=body.drain)
    finally:
        await body.close()
        await client.aclose()
