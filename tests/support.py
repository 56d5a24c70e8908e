"""Test support: real processes (Redis, the roles), the reference model, images of every kind."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXTRAL_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def open_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A plaintext channel, or a TLS one with `credentials` (grpc.ssl_channel_credentials)."""
    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, credentials)


def health_status(address: str, service: str = "", timeout_s: float = 1.0,
                  credentials: grpc.ChannelCredentials | None = None) -> int | None:
    try:
        with open_channel(address, credentials) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s).status
    except grpc.RpcError:
        return None


def wait_serving(address: str, process: subprocess.Popen | None = None, timeout_s: float = 120.0,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    give_up = time.monotonic() + timeout_s
    while health_status(address, credentials=credentials) != health_pb2.HealthCheckResponse.SERVING:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process for {address} exited with {process.returncode}")
        if time.monotonic() > give_up:
            raise TimeoutError(f"{address} not SERVING after {timeout_s} s")
        time.sleep(0.1)


class RedisServer:
    """A private redis-server on a free port (real Redis, isolated from other test runs)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="pixtral-test-redis-")
        self.process: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        give_up = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.exceptions.ConnectionError:
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Stack:
    """The roles as separate processes on loopback, like pixtral-serve starts them."""

    model_dir: Path
    redis_url: str
    cache_dir: Path
    num_vision: int = 1
    num_decoders: int = 1
    decoder_args: tuple[str, ...] = ()
    vision_args: tuple[str, ...] = ()
    gateway_args: tuple[str, ...] = ()
    with_metrics: bool = False   # each process gets a metrics port of its own (metrics_ports[name])
    credentials: grpc.ChannelCredentials | None = None   # for the health checks of TLS servers
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    gateway: str = ""
    decoders: list[str] = field(default_factory=list)
    vision: list[str] = field(default_factory=list)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    _commands: dict[str, tuple[str, list[str]]] = field(default_factory=dict, repr=False)

    def _metrics_port(self, name: str) -> str:
        if not self.with_metrics:
            return "0"
        self.metrics_ports[name] = free_port()
        return str(self.metrics_ports[name])

    def _spawn(self, name: str, role: str, args: list[str], mode: str = "wb") -> subprocess.Popen:
        log = open(self.cache_dir / f"{name}.log", mode)
        process = subprocess.Popen([sys.executable, "-m", f"services.{role}", *args], cwd=ROOT,
                                   env=child_env(PIXTRAL_CACHE_DIR=str(self.cache_dir)), stdout=log, stderr=log)
        self.processes[name] = process
        self._commands[name] = (role, args)
        return process

    def restart_process(self, name: str, address: str) -> None:
        """Starts a stopped process again with the same flags (same port), its log appended to."""
        role, args = self._commands[name]
        wait_serving(address, self._spawn(name, role, args, mode="ab"), credentials=self.credentials)

    def start_vision(self, name: str | None = None) -> str:
        name = name or f"vision{len(self.vision)}"
        port = free_port()
        process = self._spawn(name, "vision", [
            "--model", str(self.model_dir), "--redis", self.redis_url, "--host", "127.0.0.1", "--port", str(port),
            "--consumer", name, "--metrics-port", self._metrics_port(name), *self.vision_args])
        address = f"127.0.0.1:{port}"
        wait_serving(address, process, credentials=self.credentials)
        self.vision.append(address)
        return address

    def start(self) -> Stack:
        for index in range(self.num_decoders):
            port = free_port()
            name = f"decoder{index}"
            self._spawn(name, "decoder", [
                "--model", str(self.model_dir), "--redis", self.redis_url, "--host", "127.0.0.1", "--port",
                str(port), "--metrics-port", self._metrics_port(name), *self.decoder_args])
            self.decoders.append(f"127.0.0.1:{port}")
        for _ in range(self.num_vision):
            self.start_vision()
        for name, address in zip([f"decoder{i}" for i in range(self.num_decoders)], self.decoders):
            wait_serving(address, self.processes[name], credentials=self.credentials)
        self.gateway = self.start_gateway("gateway", self.gateway_args)
        return self

    def start_gateway(self, name: str, args: tuple[str, ...] = ()) -> str:
        """A gateway over this stack's decoders and Redis (the stack's own, or another one with other flags)."""
        port = free_port()
        process = self._spawn(name, "gateway", [
            "--model", str(self.model_dir), "--redis", self.redis_url, "--host", "127.0.0.1", "--port", str(port),
            "--decoder-addresses", ",".join(self.decoders), "--metrics-port", self._metrics_port(name), *args])
        address = f"127.0.0.1:{port}"
        wait_serving(address, process, credentials=self.credentials)
        return address

    def stop_process(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stops one process (SIGKILL: dies at once, as a crashed one) and waits for it."""
        process = self.processes[name]
        if process.poll() is None:
            process.send_signal(sig)
            process.wait(timeout=30)

    def metrics(self, name: str) -> str:
        """The Prometheus page of a process started with_metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_ports[name]}/metrics", timeout=10) as page:
            return page.read().decode()

    def rss_bytes(self, name: str) -> int:
        """Resident memory of a process, from /proc (VmRSS)."""
        return _proc_status_kib(self.processes[name].pid, "VmRSS") * 1024

    def peak_rss_bytes(self, name: str) -> int:
        """Highest resident memory of a process so far (VmHWM)."""
        return _proc_status_kib(self.processes[name].pid, "VmHWM") * 1024

    def log_entries(self, name: str) -> list[dict]:
        """The JSON log lines of a process (other lines, e.g. from C libraries, are left out)."""
        entries = []
        for line in self.logs(name).splitlines():
            if line.startswith("{"):
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    pass
        return entries

    def logs(self, name: str) -> str:
        return (self.cache_dir / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_value(page: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text page (its labels exactly `labels`), or None."""
    for line in page.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"] == name and dict(_LABEL.findall(match["labels"] or "")) == labels:
            return float(match["value"])
    return None


# -- error checks -----------------------------------------------------------------------------------------------

# What an error message shown to callers must never contain: tracebacks, source files, paths, memory addresses.
_LEAKS = re.compile(r"Traceback|File \"|\w\.py\b|(?<![\w.])/(?:work|home|usr|tmp|root|opt|proc|var)/"
                    r"|0x[0-9a-fA-F]{6,}|<[\w.]+ object at ")


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, *fragments: str, request_id: str = "") -> str:
    """The call failed with `code`, its message holds every fragment and leaks nothing; returns the message.

    With `request_id`, the error's trailing metadata must carry it (x-request-id)."""
    details = error.details() or ""
    assert error.code() == code, f"{error.code().name}: {details}"
    for fragment in fragments:
        assert fragment in details, f"{fragment!r} not in {details!r}"
    assert not _LEAKS.search(details), f"leaks internals: {details!r}"
    if request_id:
        trailing = dict(error.trailing_metadata() or ())
        assert trailing.get("x-request-id") == request_id, trailing
    return details


# -- images -----------------------------------------------------------------------------------------------------

def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(pixels, "RGBA")


def image_bytes(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()
