"""Test support: real processes (Redis, the roles), the reference model, images of every kind."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


def health_status(address: str, service: str = "", timeout_s: float = 1.0) -> int | None:
    try:
        with grpc.insecure_channel(address) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s).status
    except grpc.RpcError:
        return None


def wait_serving(address: str, process: subprocess.Popen | None = None, timeout_s: float = 120.0) -> None:
    give_up = time.monotonic() + timeout_s
    while health_status(address) != health_pb2.HealthCheckResponse.SERVING:
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
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    gateway: str = ""
    decoders: list[str] = field(default_factory=list)
    vision: list[str] = field(default_factory=list)

    def _spawn(self, name: str, role: str, args: list[str]) -> subprocess.Popen:
        log = open(self.cache_dir / f"{name}.log", "wb")
        process = subprocess.Popen([sys.executable, "-m", f"services.{role}", *args], cwd=ROOT,
                                   env=child_env(PIXTRAL_CACHE_DIR=str(self.cache_dir)), stdout=log, stderr=log)
        self.processes[name] = process
        return process

    def start_vision(self, name: str | None = None) -> str:
        name = name or f"vision{len(self.vision)}"
        port = free_port()
        process = self._spawn(name, "vision", [
            "--model", str(self.model_dir), "--redis", self.redis_url, "--host", "127.0.0.1", "--port", str(port),
            "--consumer", name, "--metrics-port", "0", *self.vision_args])
        address = f"127.0.0.1:{port}"
        wait_serving(address, process)
        self.vision.append(address)
        return address

    def start(self) -> Stack:
        for index in range(self.num_decoders):
            port = free_port()
            process = self._spawn(f"decoder{index}", "decoder", [
                "--model", str(self.model_dir), "--redis", self.redis_url, "--host", "127.0.0.1", "--port",
                str(port), "--metrics-port", "0", *self.decoder_args])
            self.decoders.append(f"127.0.0.1:{port}")
        for _ in range(self.num_vision):
            self.start_vision()
        for name, address in zip([f"decoder{i}" for i in range(self.num_decoders)], self.decoders):
            wait_serving(address, self.processes[name])
        port = free_port()
        process = self._spawn("gateway", "gateway", [
            "--model", str(self.model_dir), "--redis", self.redis_url, "--host", "127.0.0.1", "--port", str(port),
            "--decoder-addresses", ",".join(self.decoders), "--metrics-port", "0", *self.gateway_args])
        self.gateway = f"127.0.0.1:{port}"
        wait_serving(self.gateway, process)
        return self

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


# -- images -----------------------------------------------------------------------------------------------------

def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(pixels, "RGBA")


def image_bytes(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()
