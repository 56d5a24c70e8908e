"""What the launcher asks of this machine about its children: free ports, whether a role or a Redis answers, and
how a child ended."""

from __future__ import annotations

import random
import signal
import socket

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

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


def is_bindable(port: int) -> bool:
    """Whether an HTTP server (SO_REUSEADDR, every address) can listen on `port` now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


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


def exit_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"
