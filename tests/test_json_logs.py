"""Every line a role writes to stderr is a JSON object: its own log lines, and those that bypass logging (gRPC
core's, a C library's, a print, a warning, an uncaught exception), wrapped with a level from their first letter.
Nothing is lost at exit, not even a line written just before an abort."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from grpc_health.v1 import health_pb2

from shared.grpc_server import STARTUP_SERVICE
from tests.support import ROOT, RedisServer, child_env, free_port, health_status, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING

PROGRAM = r"""
import logging, os, sys, threading, warnings
from shared.logs import setup_logging
setup_logging("probe")
logging.getLogger("probe.own").info("through logging")
os.write(2, b"E1201 20:31:05.075294   14379 chttp2_transport.cc:1403] a native error line\n")
print("a plain print", file=sys.stderr)
warnings.warn("a warning")
def fail():
    raise RuntimeError("in a thread")
thread = threading.Thread(target=fail)
thread.start()
thread.join()
os.write(2, b"F1201 20:31:05.075294   14379 some.cc:1] the last words before an abort\n")
os.abort()
"""


def json_lines(text: str) -> list[dict]:
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)   # fails the test on any line that is not JSON
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


def test_lines_that_bypass_logging_become_json_and_none_is_lost_at_an_abort():
    result = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, env=child_env(), capture_output=True,
                            timeout=60)
    assert result.returncode == -signal.SIGABRT
    entries = json_lines(result.stderr.decode())
    by_message = {entry["msg"].strip(): entry for entry in entries}
    assert all(entry["role"] == "probe" for entry in entries)
    assert by_message["through logging"]["logger"] == "probe.own"
    native = next(entry for text, entry in by_message.items() if text.endswith("a native error line"))
    assert (native["level"], native["logger"]) == ("error", "stderr")
    assert by_message["a plain print"]["level"] == "warning"
    assert any(entry["logger"] == "py.warnings" and "a warning" in entry["msg"] for entry in entries)
    uncaught = next(entry for entry in entries if entry["msg"].startswith("uncaught RuntimeError"))
    assert uncaught["level"] == "critical" and "Traceback" in uncaught["exc"]
    last = entries[-1]
    assert last["msg"].endswith("the last words before an abort") and last["level"] == "critical"


def test_a_role_whose_grpc_core_logs_writes_only_json_lines(tiny_model, tmp_path):
    redis_server = RedisServer().start()
    port = free_port()
    # gRPC core's tracer of connectivity states logs from its own threads, here about a decoder that is not there.
    env = child_env(GRPC_VERBOSITY="debug", GRPC_TRACE="connectivity_state")
    stderr_path = tmp_path / "gateway.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.gateway", "--model", str(tiny_model), "--redis", redis_server.url,
             "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--decoder-addresses",
             f"127.0.0.1:{free_port()}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until(lambda: health_status(f"127.0.0.1:{port}", STARTUP_SERVICE) == SERVING, 120,
                   "the gateway never started")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        redis_server.stop()
    entries = json_lines(stderr_path.read_text())
    native = [entry for entry in entries if entry["logger"] == "stderr"]
    assert any("connectivity_state.cc" in entry["msg"] and entry["level"] == "info" for entry in native), native[:5]
    assert any("Log level DEBUG is not suitable" in entry["msg"] and entry["level"] == "warning" for entry in native)
    assert all(entry["role"] == "gateway" for entry in entries)
    own = [entry["msg"] for entry in entries if entry["logger"] != "stderr"]
    assert any(text.startswith("ready on port") for text in own) and any(text.startswith("draining") for text in own)
