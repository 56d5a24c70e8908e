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
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import redis
import redis.cluster
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from services.local_processes import free_port  # the tests' ports, as the launcher picks them

ROOT = Path(__file__).resolve().parent.parent
# Embedding expiry of the shared stack (conftest.py), as deployed: written by the vision worker, renewed on use.
EMBEDDING_TTL_S = 3600


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

    def __init__(self, extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="pixtral-test-redis-")
        self.process: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.extra_args = extra_args   # more redis-server options, e.g. ("--maxmemory", "64mb")

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, *self.extra_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


class LocalRedisCluster:
    """A Redis Cluster of real redis-servers on free ports: `num_primaries` primaries sharing the 16384 slots, each
    with `replicas_per_primary` replicas, made by `redis-cli --cluster create`. A node that fails is replaced by its
    replica within a few seconds (--cluster-node-timeout). Nothing is persisted but each node's nodes.conf, so a
    node started again rejoins the cluster, empty."""

    def __init__(self, num_primaries: int = 3, replicas_per_primary: int = 0, node_timeout_ms: int = 1000) -> None:
        self.ports = [free_port() for _ in range(num_primaries * (1 + replicas_per_primary))]
        self.replicas_per_primary = replicas_per_primary
        self.node_timeout_ms = node_timeout_ms
        self.dir = Path(tempfile.mkdtemp(prefix="pixtral-test-cluster-"))
        self.processes: dict[int, subprocess.Popen] = {}
        self.url = f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> LocalRedisCluster:
        for port in self.ports:
            self.start_node(port)
        command = [shutil.which("redis-cli"), "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
                   "--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"]
        subprocess.run(command, check=True, capture_output=True, timeout=60)
        self.wait_ok()
        # A replica that never synced with its primary may not take over from it (its data is too old).
        wait_until(lambda: all(self.node(port).info("replication").get("master_link_status", "up") == "up"
                               for port in self.running()), 30, "replicas not in sync", interval_s=0.1)
        return self

    def start_node(self, port: int) -> None:
        """Starts (or starts again) the node of `port`; it answers once this returns."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(self.node_timeout_ms),
             "--save", "", "--appendonly", "no", "--dir", str(node_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.node(port)
        wait_until(lambda: _answers(client), 10, f"cluster node {port} does not answer")

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node (for what one node says: its role, its view of the cluster)."""
        return redis.Redis(port=port, socket_timeout=5)

    def client(self) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster.from_url(self.url, socket_timeout=5)

    def running(self) -> list[int]:
        return [port for port, process in self.processes.items() if process.poll() is None]

    def primaries(self) -> list[int]:
        return [port for port in self.running() if self.node(port).info("replication")["role"] == "master"]

    def primary_of(self, key: str) -> int:
        """The port of the primary that serves `key`'s slot, as the running nodes see it."""
        slot = redis.cluster.key_slot(key.encode())
        for port in self.primaries():
            for start, end in _slot_ranges(self.node(port)):
                if start <= slot <= end:
                    return port
        raise LookupError(f"no running primary serves slot {slot}")

    def kill(self, port: int) -> None:
        """SIGKILL, as a crashed node or a lost machine."""
        process = self.processes[port]
        process.kill()
        process.wait(timeout=10)

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every running node says the cluster is ok (every slot served)."""
        def is_ok() -> bool:
            try:
                return all(self.node(port).cluster("info")["cluster_state"] == "ok" for port in self.running())
            except redis.exceptions.RedisError:
                return False
        wait_until(is_ok, timeout_s, "the cluster is not ok", interval_s=0.1)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def _slot_ranges(client: redis.Redis) -> list[tuple[int, int]]:
    """The slot ranges a node serves as primary (from its own line of CLUSTER NODES)."""
    for node in client.cluster("nodes").values():
        if "myself" in node["flags"]:
            return [(int(r[0]), int(r[-1])) for r in node["slots"] if not str(r[0]).startswith("[")]
    return []


@dataclass
class Stack:
    """The roles as separate processes on loopback, like pixtral-serve starts them."""

    model_dir: Path
    redis_url: str   # plain, or any node of a cluster; the jobs' and (without cache_redis_url) the cache's
    cache_dir: Path
    num_vision: int = 1
    num_decoders: int = 1
    decoder_args: tuple[str, ...] = ()
    vision_args: tuple[str, ...] = ()
    gateway_args: tuple[str, ...] = ()
    with_metrics: bool = False   # each process gets a metrics port of its own (metrics_ports[name])
    credentials: grpc.ChannelCredentials | None = None   # for the health checks of TLS servers
    cache_redis_url: str = ""   # the embedding cache's Redis, when it is not redis_url's
    serve_timeout_s: float = 120.0   # how long a process may take to serve (a 12B model on a GPU: longer)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    gateway: str = ""
    decoders: list[str] = field(default_factory=list)
    vision: list[str] = field(default_factory=list)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    _commands: dict[str, tuple[str, list[str]]] = field(default_factory=dict, repr=False)

    def _redis(self) -> list[str]:
        return ["--redis", self.redis_url, *(["--cache-redis", self.cache_redis_url] if self.cache_redis_url else [])]

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

    def restart_process(self, name: str, address: str, extra_args: tuple[str, ...] = ()) -> None:
        """Starts a stopped process again with the same flags (same port) and `extra_args` (a flag given again
        wins), its log appended to."""
        role, args = self._commands[name]
        wait_serving(address, self._spawn(name, role, [*args, *extra_args], mode="ab"), self.serve_timeout_s,
                     credentials=self.credentials)

    def start_vision(self, name: str | None = None, extra_args: tuple[str, ...] = (), wait: bool = True) -> str:
        """A vision worker (consumer `name`) with the stack's vision flags and `extra_args`; its health address."""
        name = name or f"vision{len(self.vision)}"
        port = free_port()
        process = self._spawn(name, "vision", [
            "--model", str(self.model_dir), *self._redis(), "--host", "127.0.0.1", "--port", str(port),
            "--consumer", name, "--metrics-port", self._metrics_port(name), *self.vision_args, *extra_args])
        address = f"127.0.0.1:{port}"
        if wait:
            wait_serving(address, process, self.serve_timeout_s, credentials=self.credentials)
        self.vision.append(address)
        return address

    def start(self) -> Stack:
        for index in range(self.num_decoders):
            port = free_port()
            name = f"decoder{index}"
            self._spawn(name, "decoder", [
                "--model", str(self.model_dir), *self._redis(), "--host", "127.0.0.1", "--port",
                str(port), "--metrics-port", self._metrics_port(name), *self.decoder_args])
            self.decoders.append(f"127.0.0.1:{port}")
        for _ in range(self.num_vision):
            self.start_vision()
        for name, address in zip([f"decoder{i}" for i in range(self.num_decoders)], self.decoders):
            wait_serving(address, self.processes[name], self.serve_timeout_s, credentials=self.credentials)
        self.gateway = self.start_gateway("gateway", self.gateway_args)
        return self

    def start_gateway(self, name: str, args: tuple[str, ...] = ()) -> str:
        """A gateway over this stack's decoders and Redis (the stack's own, or another one with other flags)."""
        port = free_port()
        process = self._spawn(name, "gateway", [
            "--model", str(self.model_dir), *self._redis(), "--host", "127.0.0.1", "--port", str(port),
            "--decoder-addresses", ",".join(self.decoders), "--metrics-port", self._metrics_port(name), *args])
        address = f"127.0.0.1:{port}"
        wait_serving(address, process, self.serve_timeout_s, credentials=self.credentials)
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


# -- what must be left behind: nothing ---------------------------------------------------------------------------

def pending_jobs(client: redis.Redis) -> int:
    """Encode jobs delivered to a worker and not acknowledged (XPENDING of the consumer group)."""
    from shared import encode_jobs
    try:
        return client.xpending(encode_jobs.STREAM, encode_jobs.GROUP)["pending"]
    except redis.exceptions.ResponseError:   # no stream or no group: nothing can be pending
        return 0


def held_locks(client: redis.Redis) -> list[str]:
    """Single-flight locks that do not expire (a leak); locks with an expiry go away by themselves."""
    return [key.decode() for key in client.scan_iter(match="pixtral:lock:encode:*") if client.ttl(key) == -1]


def decoder_load(stack: Stack, name: str = "decoder0") -> dict[str, float]:
    """Running and waiting requests and KV-cache use of a decoder started with_metrics, from its metrics page."""
    page = stack.metrics(name)
    return {key: metric_value(page, f"pixtral_decoder_{key}") for key in (
        "running_requests", "waiting_requests", "kv_cache_usage_ratio", "generated_tokens_total")}


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    """Polls `predicate` until it returns something true (returned); fails with `what` after timeout_s."""
    give_up = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < give_up, f"not within {timeout_s} s: {what}"
        time.sleep(interval_s)


def assert_nothing_left(stack: Stack, client: redis.Redis, timeout_s: float = 10.0,
                        decoders: tuple[str, ...] = ("decoder0",)) -> None:
    """No encode job pending, no lock that never expires, every decoder idle with its KV cache empty."""
    wait_until(lambda: pending_jobs(client) == 0, timeout_s, f"encode jobs still pending: {pending_jobs(client)}")
    wait_until(lambda: not held_locks(client), timeout_s, f"locks held for ever: {held_locks(client)}")
    for name in decoders:
        wait_decoder_idle(stack, timeout_s, name)


def wait_decoder_idle(stack: Stack, timeout_s: float, name: str = "decoder0") -> None:
    """Until the decoder runs nothing, queues nothing and holds no KV block; fails after timeout_s."""
    def is_idle() -> bool:
        load = decoder_load(stack, name)
        return (load["running_requests"], load["waiting_requests"], load["kv_cache_usage_ratio"]) == (0, 0, 0)
    wait_until(is_idle, timeout_s, f"{name} still busy: {decoder_load(stack, name)}")


# -- a TCP proxy between the roles and Redis, to make Redis slow or cut it off -------------------------------------

class TcpProxy:
    """Forwards connections from a free port to `target_port`; can delay each chunk, stall (hold everything, as
    a hung server or a black-holed network does), cut every connection (as a restarted server or a broken
    network does), or drop the next request sent and its connection (a blip: the command never arrives)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay_s = 0.0
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._closed = False
        self._drop_next = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_next(self) -> None:
        """The next chunk a client sends is not forwarded: its connection is closed instead."""
        self._drop_next.set()

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Closes every open connection (new ones are accepted)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()   # the target is down: refused, as it would be
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink, from_client in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(source, sink, from_client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if from_client and self._drop_next.is_set():
                    self._drop_next.clear()
                    break
                self._flowing.wait()
                if self.delay_s:
                    time.sleep(self.delay_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


# -- chat calls that may fail ------------------------------------------------------------------------------------

@dataclass
class ChatOutcome:
    """What a Chat call got: its messages, its final status, how long it took."""

    responses: list
    code: grpc.StatusCode
    details: str
    request_id: str      # x-request-id of the trailing metadata (errors), else of the messages
    seconds: float
    first_token_s: float | None = None   # seconds to the first token, if any

    @property
    def time_per_token(self) -> float:
        """Seconds per token after the first."""
        return (self.seconds - self.first_token_s) / max(1, len(self.token_ids) - 1)

    @property
    def token_ids(self) -> list[int]:
        return [token for response in self.responses for token in response.token_ids]

    @property
    def last(self):
        return self.responses[-1] if self.responses else None


def call_chat(gateway: str, request, timeout_s: float = 60.0) -> ChatOutcome:
    """One Chat call to its end, successful or not."""
    from pixtral.v1 import gateway_pb2_grpc
    started = time.monotonic()
    responses, first_token_s = [], None
    with grpc.insecure_channel(gateway) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=timeout_s)
        try:
            for response in call:
                responses.append(response)
                if response.token_ids and first_token_s is None:
                    first_token_s = time.monotonic() - started
            code, details, request_id = grpc.StatusCode.OK, "", responses[0].request_id if responses else ""
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
            request_id = dict(error.trailing_metadata() or ()).get("x-request-id", "")
    return ChatOutcome(responses, code, details, request_id, time.monotonic() - started, first_token_s)


class BackgroundChat:
    """A Chat stream read in a thread of its own: `wait_tokens(n)` until it has streamed n tokens, `result()` for
    its ChatOutcome once it ends."""

    def __init__(self, gateway: str, request, timeout_s: float = 60.0) -> None:
        from pixtral.v1 import gateway_pb2_grpc
        self._channel = grpc.insecure_channel(gateway)
        self.call = gateway_pb2_grpc.GatewayStub(self._channel).Chat(request, timeout=timeout_s)
        self.responses: list = []
        self._outcome: ChatOutcome | None = None
        self._done = threading.Event()
        self._started = time.monotonic()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        code, details, request_id = grpc.StatusCode.OK, "", ""
        try:
            for response in self.call:
                self.responses.append(response)
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
            request_id = dict(error.trailing_metadata() or ()).get("x-request-id", "")
        self._outcome = ChatOutcome(list(self.responses), code, details, request_id,
                                    time.monotonic() - self._started)
        self._done.set()
        self._channel.close()

    @property
    def num_tokens(self) -> int:
        return sum(len(response.token_ids) for response in self.responses)

    def wait_tokens(self, count: int, timeout_s: float = 30.0) -> None:
        wait_until(lambda: self.num_tokens >= count or self._done.is_set(), timeout_s,
                   f"{self.num_tokens} tokens streamed, wanted {count}")
        assert self.num_tokens >= count, f"the stream ended after {self.num_tokens} tokens: {self._outcome}"

    def result(self, timeout_s: float = 60.0) -> ChatOutcome:
        assert self._done.wait(timeout_s), f"the stream did not end within {timeout_s} s"
        return self._outcome
