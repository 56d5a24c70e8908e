"""Start-up health (what Kubernetes' startup probe checks): every role answers `startup` NOT_SERVING while it loads
and SERVING once it has loaded, whatever Redis does, so a pod that loaded its model while Redis was away is not
restarted; readiness ("") waits for Redis; `liveness` is SERVING from the first answer. A role started while Redis
is away keeps running and serves once Redis comes up."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from grpc_health.v1 import health_pb2

from shared.grpc_server import LIVENESS_SERVICE, STARTUP_SERVICE
from tests.support import RedisServer, free_port, health_status

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = (STARTUP_SERVICE, "", LIVENESS_SERVICE)


def statuses(address: str) -> tuple:
    return tuple(health_status(address, service) for service in SERVICES)


@pytest.mark.parametrize("role", ["gateway", "vision", "decoder"])
def test_startup_covers_loading_and_does_not_wait_for_redis(tiny_model, tmp_path, role):
    redis_server = RedisServer()   # its port, with nothing listening yet
    port = free_port()
    address = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", f"services.{role}", "--model", str(tiny_model), "--redis", redis_server.url,
               "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--redis-timeout-s", "0.5"]
    if role == "gateway":
        command += ["--decoder-addresses", f"127.0.0.1:{free_port()}"]
    log = (tmp_path / f"{role}.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        observed = []   # each change of (startup, readiness, liveness), from the first answer on
        give_up = time.monotonic() + 120
        while not observed or observed[-1][0] != SERVING:
            assert process.poll() is None, f"{role} exited: {(tmp_path / f'{role}.log').read_text()[-2000:]}"
            assert time.monotonic() < give_up, f"{role} never reported started: {observed}"
            now = statuses(address)
            if now[0] is not None and (not observed or observed[-1] != now):
                observed.append(now)
            time.sleep(0.02)
        assert observed[0] == (NOT_SERVING, NOT_SERVING, SERVING), f"while loading: {observed}"
        # Loaded, with Redis away: started and alive, not ready; and so it stays.
        time.sleep(1.5)
        assert statuses(address) == (SERVING, NOT_SERVING, SERVING)
        assert process.poll() is None
        redis_server.start()
        give_up = time.monotonic() + 20
        while statuses(address) != (SERVING, SERVING, SERVING):
            assert time.monotonic() < give_up, f"not ready after Redis came up: {statuses(address)}"
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=30)
        redis_server.stop()
        log.close()
