"""`pixtral-serve`: every role as its own process on this machine, for development and single-host serving.

Starts Redis if needed (two: a cache bounded by --cache-memory-mib that evicts the least recently used embeddings,
and one for the job protocol that evicts nothing), M decoders, N vision workers and the gateway; prints
`ready <host:port>` once the gateway answers SERVING, and on stderr where each role serves its metrics
(`metrics <name> <url>`).

It supervises them: a child that dies is started again after a backoff that doubles with each crash, on the same
port with the same flags, while the others go on serving (one line on stderr says which child died, how, and when
it comes back). The gateway finds a restarted decoder again, a restarted vision worker (same consumer name) takes
up the jobs it held, a private Redis comes back empty (the roles survive that). Only a child crashing more than
`--max-restarts` times within `--restart-window-s` ends pixtral-serve: every child is stopped, and it exits 1.

On Ctrl-C or SIGTERM it stops them in order: the gateway first (its streams finish on decoders that are still up,
and requests waiting for an image get it from vision workers that are still up), then the decoders and vision
workers, then Redis. Each role gets `--drain-grace-s` (passed to every role, so they agree) plus `--grace-s` to
exit before SIGKILL. The children run in process groups of their own, so that a Ctrl-C in a terminal reaches
pixtral-serve alone and the stop keeps its order.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


from services.gpu_placement import VISION_PLACEMENTS, place, visible_gpus
from services.local_processes import exit_status, free_port, is_bindable, is_serving, redis_answers
from shared.settings import env_name, load_config, option
from shared.tiny import resolve_model

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
MAX_BACKOFF_S = 30.0
# Stop order: the gateway, then the roles it calls, then what they all use.
GATEWAY_STAGE, WORKER_STAGE, REDIS_STAGE = 0, 1, 2


@dataclass(frozen=True)
class ServeConfig:
    """Run the whole Pixtral service (gateway, vision workers, decoders, Redis) on this machine."""

    model: str = option("tiny", "checkpoint directory, or 'tiny' for the built-in tiny model")
    redis: str = option("auto", f"Redis URL (plain, or any node of a Redis Cluster) of the cache and the jobs; auto: "
                                f"{LOCAL_REDIS} if it answers, else private ones; private: always two private "
                                "redis-servers, a cache bounded by --cache-memory-mib and one for the jobs")
    cache_memory_mib: int = option(0, "memory of the private cache Redis, which evicts the least recently used "
                                      "embeddings once full; 0: an eighth of this machine's memory")
    vision_workers: int = option(1, "vision worker processes")
    decoders: int = option(1, "decoder processes")
    port: int = option(50051, "gateway port")
    http_port: int = option(8000, "port of the gateway's OpenAI-compatible HTTP API (printed as `http <url>` after "
                                  "`ready`); 0: none")
    device: str = option("cpu", "cpu or cuda")
    gpus: str = option("", "with --device cuda: the GPUs the roles are placed on, as CUDA_VISIBLE_DEVICES names "
                           "them (e.g. 0,1); empty: every GPU visible. One decoder per GPU while there are enough")
    vision_gpus: str = option("shared", "with --device cuda: shared (vision workers on the decoders' GPUs, in turn) "
                                        "or own (on the GPUs no decoder uses)")
    quantization: str = option("", "the decoders' --quantization: empty (the checkpoint's weights) or fp8")
    kv_cache_dtype: str = option("auto", "the decoders' --kv-cache-dtype: auto (the model's dtype) or fp8")
    host: str = option("127.0.0.1", "address the gateway listens on and `ready` prints")
    startup_timeout_s: float = option(900.0, "how long the roles may take to load")
    drain_grace_s: float = option(30.0, "on stop, seconds each role gives its calls and jobs in flight to finish "
                                        "(passed to every role as its --drain-grace-s)")
    grace_s: float = option(10.0, "on stop, seconds a role gets beyond --drain-grace-s to exit before SIGKILL")
    metrics_port: int = option(9100, "Prometheus port of the gateway; the decoders, then the vision workers, get "
                                     "the ports after it, in order; 0: no metrics endpoints")
    max_restarts: int = option(5, "restarts of one child within --restart-window-s; one more crash stops everything")
    restart_window_s: float = option(60.0, "the window --max-restarts counts crashes in")
    restart_backoff_s: float = option(0.5, "delay before a crashed child is started again; doubles with each crash "
                                           f"within the window, up to {MAX_BACKOFF_S:.0f} s")
    auth_token: str = option("", "bearer token of every role (the gateway's callers and its decoder calls); "
                                 "prefer the environment to the flag; empty: none", secret=True)

    def __post_init__(self) -> None:
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"--http-port must be a port or 0, got {self.http_port}")
        if self.vision_workers < 1 or self.decoders < 1:
            raise ValueError("--vision-workers and --decoders must be at least 1")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.vision_gpus not in VISION_PLACEMENTS:
            raise ValueError(f"--vision-gpus must be one of {', '.join(VISION_PLACEMENTS)}, got {self.vision_gpus!r}")
        if self.cache_memory_mib < 0:
            raise ValueError("--cache-memory-mib must not be negative")
        if self.max_restarts < 0 or min(self.drain_grace_s, self.grace_s, self.restart_backoff_s) < 0 or \
                self.restart_window_s <= 0 or not 0 <= self.metrics_port < 65536:
            raise ValueError("--max-restarts, --drain-grace-s, --grace-s and --restart-backoff-s must not be "
                             "negative, --restart-window-s must be positive, --metrics-port a port or 0")


@dataclass(frozen=True)
class ChildSpec:
    name: str                # gateway, decoder0, vision1, redis: also its log file's name
    argv: tuple[str, ...]
    stage: int               # when it is stopped (GATEWAY_STAGE first)
    env: tuple[tuple[str, str], ...] = ()   # added to the environment (its GPU)


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen
    crashes: deque[float] = field(default_factory=deque)   # when it died, within the restart window
    restart_at: float | None = None                         # set while it waits to be started again


class StopRequested(Exception):
    """Ctrl-C or SIGTERM arrived: stop every child, in order."""


class Launcher:
    def __init__(self, config: ServeConfig, log_dir: Path | None = None) -> None:
        """`log_dir`: each child writes its output to `<name>.log` there (gateway.log, decoder0.log, ...) rather
        than to ours."""
        self.config = config
        self.log_dir = log_dir
        self._children: dict[str, Child] = {}
        self._redis_dir: str | None = None
        self._logs: dict[str, IO[bytes]] = {}   # child name -> its log file (with log_dir)
        self.is_stop_requested = False   # set by a signal handler (main): checked between waits

    @property
    def children(self) -> list[tuple[str, subprocess.Popen]]:
        """(name, process) of every child, as started last."""
        return [(name, child.process) for name, child in self._children.items()]

    def _popen(self, spec: ChildSpec) -> subprocess.Popen:
        env = None
        if self.config.auth_token or spec.env:
            env = {**os.environ, **dict(spec.env)}
        if self.config.auth_token:  # through the environment: argv is visible to every user of the machine
            env[env_name("auth_token")] = self.config.auth_token
        output = None
        if self.log_dir is not None:   # a restarted child's output follows its first run's
            previous = self._logs.pop(spec.name, None)
            if previous is not None:
                previous.close()
            output = self._logs[spec.name] = open(self.log_dir / f"{spec.name}.log", "ab" if previous else "wb")
        # Without a log folder every child writes to our stderr: our stdout carries `ready` alone.
        return subprocess.Popen(spec.argv, stdin=subprocess.DEVNULL, env=env,
                                stdout=sys.stderr.fileno() if output is None else output,
                                stderr=None if output is None else subprocess.STDOUT, process_group=0)

    def spawn(self, spec: ChildSpec) -> subprocess.Popen:
        self._children[spec.name] = Child(spec, self._popen(spec))
        return self._children[spec.name].process

    # -- supervision ----------------------------------------------------------------------------------------------

    def supervise(self) -> None:
        """Starts again the children due for it and notices those that died; SystemExit when one crashed more than
        max_restarts times within the restart window."""
        c = self.config
        now = time.monotonic()
        for child in self._children.values():
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.process, child.restart_at = self._popen(child.spec), None
                continue
            if child.process.poll() is None:
                continue
            status = exit_status(child.process.returncode)
            child.crashes.append(now)
            while child.crashes and child.crashes[0] < now - c.restart_window_s:
                child.crashes.popleft()
            if len(child.crashes) > c.max_restarts:
                raise SystemExit(f"{child.spec.name} (pid {child.process.pid}) {status}: {len(child.crashes)} "
                                 f"crashes within {c.restart_window_s:g} s, more than --max-restarts "
                                 f"{c.max_restarts}; stopping every role")
            delay = min(MAX_BACKOFF_S, c.restart_backoff_s * 2 ** (len(child.crashes) - 1))
            child.restart_at = now + delay
            print(f"pixtral-serve: {child.spec.name} (pid {child.process.pid}) {status}; restarting it in "
                  f"{delay:g} s (restart {len(child.crashes)} of at most {c.max_restarts} within "
                  f"{c.restart_window_s:g} s)", file=sys.stderr, flush=True)

    def serve_forever(self) -> None:
        """Supervises the children until a stop is requested (StopRequested) or one crashes too often."""
        while True:
            self._check_stop()
            self.supervise()
            time.sleep(0.1)

    def wait_for(self, what: str, is_ready) -> None:
        give_up = time.monotonic() + self.config.startup_timeout_s
        while not is_ready():
            self._check_stop()
            self.supervise()
            if time.monotonic() > give_up:
                raise SystemExit(f"{what} not ready after {self.config.startup_timeout_s:.0f} s")
            time.sleep(0.2)

    def _check_stop(self) -> None:
        if self.is_stop_requested:
            raise StopRequested

    # -- start ------------------------------------------------------------------------------------------------------

    def start_redis(self) -> tuple[str, str]:
        """(cache URL, jobs URL): the Redis given (both), or two private ones. The cache is bounded and evicts the
        least recently used embeddings; the jobs Redis evicts nothing (the stream, locks and heartbeats must stay).
        Embeddings then need no expiry."""
        if self.config.redis not in ("auto", "private"):
            return self.config.redis, self.config.redis
        if self.config.redis == "auto" and redis_answers(LOCAL_REDIS):
            return LOCAL_REDIS, LOCAL_REDIS
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("no Redis answers on 127.0.0.1:6379 and redis-server is not installed")
        self._redis_dir = tempfile.mkdtemp(prefix="pixtral-redis-")
        jobs = self._start_private_redis("redis_jobs", server, ("--maxmemory-policy", "noeviction"))
        cache = self._start_private_redis("redis", server, (
            "--maxmemory", f"{self.cache_memory_mib()}mb", "--maxmemory-policy", "allkeys-lru",
            "--maxmemory-samples", "10"))
        return cache, jobs

    def cache_memory_mib(self) -> int:
        if self.config.cache_memory_mib:
            return self.config.cache_memory_mib
        return max(64, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8 >> 20)

    def _start_private_redis(self, name: str, server: str, settings: tuple[str, ...]) -> str:
        port = free_port()
        self.spawn(ChildSpec(name, (server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", self._redis_dir, "--logfile", "",
                                    "--loglevel", "warning", *settings), REDIS_STAGE))
        url = f"redis://127.0.0.1:{port}/0"
        self.wait_for(name, lambda: redis_answers(url))
        return url

    def metrics_ports(self) -> dict[str, int]:
        """Child name -> its metrics port: the gateway's --metrics-port, then the decoders', then the vision
        workers' (0 for all with --metrics-port 0)."""
        c = self.config
        names = ["gateway", *(f"decoder{i}" for i in range(c.decoders)),
                 *(f"vision{i}" for i in range(c.vision_workers))]
        return {name: c.metrics_port + index if c.metrics_port else 0 for index, name in enumerate(names)}

    def start(self) -> str:
        c = self.config
        metrics = self.metrics_ports()
        if c.http_port and not is_bindable(c.http_port):
            raise SystemExit(f"HTTP port {c.http_port} is in use (--http-port; 0: none)")
        for name, port in metrics.items():
            if port and not is_bindable(port):
                raise SystemExit(f"metrics port {port} of {name} is in use (--metrics-port {c.metrics_port} takes "
                                 f"{len(metrics)} ports in a row; 0: none)")
        model = str(resolve_model(c.model))  # made once here, not raced by the children
        cache_url, jobs_url = self.start_redis()
        if c.metrics_port:
            metrics_host = "127.0.0.1" if c.host in ("0.0.0.0", "::", "") else c.host
            for name, port in metrics.items():
                print(f"metrics {name} http://{metrics_host}:{port}/metrics", file=sys.stderr, flush=True)
        python = [sys.executable, "-m"]
        cache = ("--cache-redis", cache_url) if cache_url != jobs_url else ()
        common = ["--model", model, "--redis", jobs_url, *cache, "--drain-grace-s", f"{c.drain_grace_s:g}"]
        # On CPU the model processes share the cores: give each its share of torch threads.
        threads = ["--torch-threads", str(max(1, (os.cpu_count() or 1) // (c.decoders + c.vision_workers)))] \
            if c.device == "cpu" else []
        # On CUDA each model process sees one GPU; decoders sharing one split the memory their KV caches are sized
        # from (vision workers use little).
        try:
            placement = place(visible_gpus(c.gpus), c.decoders, c.vision_workers, c.vision_gpus) \
                if c.device == "cuda" else None
        except ValueError as error:
            raise SystemExit(f"pixtral-serve: {error}") from None
        precision = ["--quantization", c.quantization, "--kv-cache-dtype", c.kv_cache_dtype]
        decoder_addresses, worker_addresses = [], []
        for index in range(c.decoders):
            name, port = f"decoder{index}", free_port()
            memory, env = [], ()
            if placement is not None:
                gpu, share = placement.decoders[index]
                memory, env = ["--gpu-memory-utilization", f"{share:g}"], (("CUDA_VISIBLE_DEVICES", gpu),)
            self.spawn(ChildSpec(name, (*python, "services.decoder", *common, "--port", str(port), "--host",
                                        "127.0.0.1", "--device", c.device, "--metrics-port", str(metrics[name]),
                                        *threads, *memory, *precision), WORKER_STAGE, env))
            decoder_addresses.append(f"127.0.0.1:{port}")
        for index in range(c.vision_workers):
            name, port = f"vision{index}", free_port()
            # The consumer name outlives a restart: the new process takes up the jobs the old one held.
            self.spawn(ChildSpec(name, (*python, "services.vision", *common, "--port", str(port), "--host",
                                        "127.0.0.1", "--device", c.device, "--consumer",
                                        f"vision-{index}-{os.getpid()}", "--metrics-port", str(metrics[name]),
                                        *threads), WORKER_STAGE,
                                 () if placement is None else (("CUDA_VISIBLE_DEVICES", placement.vision[index]),)))
            worker_addresses.append(f"127.0.0.1:{port}")
        for address in decoder_addresses + worker_addresses:
            self.wait_for(address, lambda address=address: is_serving(address))
        self.spawn(ChildSpec("gateway", (*python, "services.gateway", *common, "--port", str(c.port), "--host",
                                         c.host, "--decoder-addresses", ",".join(decoder_addresses),
                                         "--metrics-port", str(metrics["gateway"]), "--http-port", str(c.http_port)),
                             GATEWAY_STAGE))
        gateway = f"{c.host}:{c.port}"
        self.wait_for("gateway", lambda: is_serving(gateway))
        return gateway

    # -- stop -------------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stops the children stage by stage: SIGTERM, then SIGKILL for those still running after the stage's
        grace (the roles': --drain-grace-s + --grace-s; Redis: --grace-s)."""
        for stage in (GATEWAY_STAGE, WORKER_STAGE, REDIS_STAGE):
            members = [child.process for child in self._children.values() if child.spec.stage == stage
                       and child.restart_at is None and child.process.poll() is None]
            for process in members:
                process.send_signal(signal.SIGTERM)
            grace_s = self.config.grace_s + (self.config.drain_grace_s if stage != REDIS_STAGE else 0.0)
            give_up = time.monotonic() + grace_s
            for process in members:
                try:
                    process.wait(timeout=max(0.1, give_up - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self._redis_dir:
            shutil.rmtree(self._redis_dir, ignore_errors=True)
        for output in self._logs.values():
            output.close()


def main(argv: list[str] | None = None) -> int:
    config = load_config(ServeConfig, argv)
    launcher = Launcher(config)

    def on_signal(signum, frame):
        launcher.is_stop_requested = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        gateway = launcher.start()
        print(f"ready {gateway}", flush=True)
        if config.http_port:
            http_host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
            print(f"http http://{http_host}:{config.http_port}/v1", flush=True)
        launcher.serve_forever()
    except StopRequested:
        return 0
    except SystemExit as error:
        print(f"pixtral-serve: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        launcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
