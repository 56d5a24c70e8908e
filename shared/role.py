"""What every role's process does the same way: its common options, and `run_role`, which runs a role from start to
stop: logs, signals, the gRPC server with health (and reflection), the Redis client and readiness, metrics, and the
drain on SIGTERM. A role's __main__ gives it the role's options and a `build` coroutine that loads the role.

Readiness ("" health) is SERVING while Redis answers (the cache's and the jobs', when they are two) and every
condition the role adds holds; `startup` turns SERVING once `build` returned; `liveness` is SERVING while the process
runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from shared import tls
from shared.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, GrpcServer, install_stop_signals
from shared.health import Readiness, watch_redis
from shared.logs import setup_logging
from shared.metrics import serve_metrics, watch_event_loop
from shared.redis_client import Endpoint
from shared.settings import load_config, option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoleOptions:
    """Options of every role (each role's config adds its own and its own port defaults)."""

    model: str = option("tiny", "checkpoint directory (Hugging Face or Mistral layout), or 'tiny' for the built-in "
                                "tiny model")
    redis: str = option("redis://127.0.0.1:6379/0", "Redis URL of the embedding cache and the job stream (each "
                                                    "unless --cache-redis or --jobs-redis names another): a plain "
                                                    "Redis or any node of a Redis Cluster")
    cache_redis: str = option("", "Redis URL of the embedding cache (plain, or any node of a Redis Cluster); "
                                  "empty: --redis")
    jobs_redis: str = option("", "Redis URL of the encode-job stream, its locks and results (plain, or any node "
                                 "of a Redis Cluster); empty: --redis")
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

    @property
    def cache_redis_url(self) -> str:
        return self.cache_redis or self.redis

    @property
    def jobs_redis_url(self) -> str:
        return self.jobs_redis or self.redis


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
    """What a role's build gets: its options, the server (already answering health), readiness, and the Redis of
    the embedding cache and that of the job protocol (one and the same when their URLs are)."""

    options: RoleOptions
    server: GrpcServer
    readiness: Readiness
    cache_redis: Endpoint
    jobs_redis: Endpoint


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
    # Only the jobs Redis is read blocking (a vision worker's XREADGROUP BLOCK); one client when the URLs are equal.
    jobs = Endpoint(options.jobs_redis_url, options.redis_timeout_s, blocking_s=redis_blocking_s)
    cache = jobs if options.cache_redis_url == options.jobs_redis_url else \
        Endpoint(options.cache_redis_url, options.redis_timeout_s)
    redis_names = {"redis": jobs} if cache is jobs else {"cache redis": cache, "jobs redis": jobs}
    for name in redis_names:
        await readiness.set(name, False)   # until its watcher's first check answers
    body = await build(RoleContext(options, server, readiness, cache, jobs))
    serve_metrics(options.metrics_port, options.host)
    watchers = [asyncio.create_task(watch_redis(redis, functools.partial(readiness.set, name), name=name))
                for name, redis in redis_names.items()]
    watchers.append(asyncio.create_task(watch_event_loop()))
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
        for redis in redis_names.values():
            await redis.aclose()
