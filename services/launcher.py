"""`pixtral-serve`: every role as its own process on this machine, for development and single-host serving.

Starts Redis if needed, M decoders, N vision workers and the gateway; prints `ready <host:port>` once the gateway
answers SERVING; on Ctrl-C or SIGTERM stops all children (SIGTERM, then SIGKILL after the grace period). If any
child dies, the others are stopped and pixtral-serve exits non-zero.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.settings import env_name, load_config, option
from shared.tiny import resolve_model

LOCAL_REDIS = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class ServeConfig:
    """Run the whole Pixtral service (gateway, vision workers, decoders, Redis) on this machine."""

    model: str = option("tiny", "checkpoint directory, or 'tiny' for the built-in tiny model")
    redis: str = option("auto", f"Redis URL; auto: {LOCAL_REDIS} if it answers, else a private redis-server")
    vision_workers: int = option(1, "vision worker processes")
    decoders: int = option(1, "decoder processes")
    port: int = option(50051, "gateway port")
    device: str = option("cpu", "cpu or cuda")
    host: str = option("127.0.0.1", "address the gateway listens on and `ready` prints")
    startup_timeout_s: float = option(900.0, "how long the roles may take to load")
    grace_s: float = option(10.0, "on stop, seconds children get before SIGKILL")
    auth_token: str = option("", "bearer token of every role (the gateway's callers and its decoder calls); "
                                 "prefer the environment to the flag; empty: none", secret=True)

    def __post_init__(self) -> None:
        if self.vision_workers < 1 or self.decoders < 1:
            raise ValueError("--vision-workers and --decoders must be at least 1")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")


_given_ports: set[int] = set()


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port for a process about to start. Taken below the kernel's ephemeral range: a port from that range
    can be handed to some outgoing connection (to Redis, say) before the process binds it. Never the same port
    twice in this process."""
    low = _ephemeral_start()
    for _ in range(1000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", random.randrange(10000, low) if low > 11000 else 0))
            except OSError:
                continue
            port = sock.getsockname()[1]
        if port not in _given_ports:   # checked after the bind: port 0 picks one of the kernel's own
            _given_ports.add(port)
            return port
    raise OSError("no free port found")


def is_serving(address: str, timeout_s: float = 1.0) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            return response.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.exceptions.RedisError:
        return False


class Launcher:
    def __init__(self, config: ServeConfig, log_dir: Path | None = None) -> None:
        """`log_dir`: each child writes its output to `<name>.log` there (gateway.log, decoder0.log, ...) rather
        than to ours."""
        self.config = config
        self.log_dir = log_dir
        self.children: list[tuple[str, subprocess.Popen]] = []
        self._redis_dir: str | None = None
        self._logs: list[IO[bytes]] = []

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        env = None
        if self.config.auth_token:  # through the environment: argv is visible to every user of the machine
            env = {**os.environ, env_name("auth_token"): self.config.auth_token}
        output = None
        if self.log_dir is not None:
            output = open(self.log_dir / f"{name.replace(' ', '')}.log", "wb")
            self._logs.append(output)
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env, stdout=output,
                                   stderr=None if output is None else subprocess.STDOUT)
        self.children.append((name, process))
        return process

    def start_redis(self) -> str:
        if self.config.redis != "auto":
            return self.config.redis
        if redis_answers(LOCAL_REDIS):
            return LOCAL_REDIS
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("no Redis answers on 127.0.0.1:6379 and redis-server is not installed")
        port = free_port()
        self._redis_dir = tempfile.mkdtemp(prefix="pixtral-redis-")
        self.spawn("redis", [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", self._redis_dir, "--logfile", ""])
        url = f"redis://127.0.0.1:{port}/0"
        self.wait_for("redis", lambda: redis_answers(url))
        return url

    def wait_for(self, what: str, is_ready) -> None:
        give_up = time.monotonic() + self.config.startup_timeout_s
        while not is_ready():
            self.check_children()
            if time.monotonic() > give_up:
                raise SystemExit(f"{what} not ready after {self.config.startup_timeout_s:.0f} s")
            time.sleep(0.2)

    def check_children(self) -> None:
        for name, process in self.children:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited with status {process.returncode}")

    def start(self) -> str:
        c = self.config
        model = str(resolve_model(c.model))  # made once here, not raced by the children
        redis_url = self.start_redis()
        python = [sys.executable, "-m"]
        # On CPU the model processes share the cores: give each its share of torch threads.
        threads = ["--torch-threads", str(max(1, (os.cpu_count() or 1) // (c.decoders + c.vision_workers)))] \
            if c.device == "cpu" else []
        # On one GPU the decoders split the memory their KV caches are sized from (vision workers use little).
        memory = ["--gpu-memory-utilization", f"{0.85 / c.decoders:.3f}"] if c.device == "cuda" else []
        decoder_addresses = []
        for index in range(c.decoders):
            port = free_port()
            self.spawn(f"decoder {index}", [*python, "services.decoder", "--model", model, "--redis", redis_url,
                                            "--port", str(port), "--host", "127.0.0.1", "--device", c.device,
                                            "--metrics-port", "0", *threads, *memory])
            decoder_addresses.append(f"127.0.0.1:{port}")
        vision_addresses = []
        for index in range(c.vision_workers):
            port = free_port()
            self.spawn(f"vision {index}", [*python, "services.vision", "--model", model, "--redis", redis_url,
                                           "--port", str(port), "--host", "127.0.0.1", "--device", c.device,
                                           "--consumer", f"vision-{index}-{os.getpid()}", "--metrics-port", "0",
                                           *threads])
            vision_addresses.append(f"127.0.0.1:{port}")
        for address in decoder_addresses + vision_addresses:
            self.wait_for(address, lambda address=address: is_serving(address))
        self.spawn("gateway", [*python, "services.gateway", "--model", model, "--redis", redis_url, "--port",
                               str(c.port), "--host", c.host, "--decoder-addresses", ",".join(decoder_addresses),
                               "--metrics-port", "0"])
        gateway = f"{c.host}:{c.port}"
        self.wait_for("gateway", lambda: is_serving(gateway))
        return gateway

    def stop(self) -> None:
        for _, process in reversed(self.children):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        give_up = time.monotonic() + self.config.grace_s
        for _, process in self.children:
            try:
                process.wait(timeout=max(0.1, give_up - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._redis_dir:
            shutil.rmtree(self._redis_dir, ignore_errors=True)
        for output in self._logs:
            output.close()


def main(argv: list[str] | None = None) -> int:
    config = load_config(ServeConfig, argv)
    launcher = Launcher(config)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        gateway = launcher.start()
        print(f"ready {gateway}", flush=True)
        while True:
            launcher.check_children()
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except SystemExit as error:
        print(f"pixtral-serve: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        launcher.stop()


if __name__ == "__main__":
    sys.exit(main())
