"""pixtral-serve supervises its children (`python -m services.launcher`, run as users run it, on the tiny model with
a private Redis):

- a vision worker, a decoder or the private Redis killed with SIGKILL is started again, on the same port, while the
  others serve (a stream in flight goes on to its end, a new chat is answered);
- a child that keeps crashing ends pixtral-serve with status 1 and nothing of it left running;
- SIGTERM stops the roles in order: the gateway drains first (its stream in flight finishes, a request waiting for
  an image encode gets it), then the decoders and vision workers, then Redis;
- every child's metrics page answers, on the ports after --metrics-port, in order.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
import redis

from grpc_health.v1 import health_pb2

from pixtral.v1 import common_pb2
from services.local_processes import _given_ports, is_bindable, redis_answers
from tests.reference import chat_request
from tests.support import (ROOT, BackgroundChat, call_chat, child_env, free_port, health_status, image_bytes,
                           metric_value, noise_image, pending_jobs, wait_until)

SERVING = health_pb2.HealthCheckResponse.SERVING
LONG_STREAM_TOKENS = 3000   # seconds of streaming on the tiny model: it outlasts what each test does meanwhile
RESTART_LINE = re.compile(r"^pixtral-serve: (\w+) \(pid (\d+)\) (.+); restarting it in ([\d.]+) s")

_seeds = iter(range(9000, 10000))


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (for --metrics-port)."""
    while True:
        base = free_port()
        rest = range(base + 1, base + count)
        if all(port not in _given_ports and is_bindable(port) for port in rest):
            _given_ports.update(rest)
            return base


class Serve:
    """pixtral-serve as a process: its stdout's `ready` line, its stderr in a file, its children by name."""

    def __init__(self, tmp_path: Path, tiny_model: Path, *args: str, **env: str) -> None:
        self.port = free_port()
        self.gateway = f"127.0.0.1:{self.port}"
        self.http_port = free_port()   # not the default 8000: the module's launchers run side by side
        self.stderr_path = tmp_path / "serve.stderr"
        # Every process it starts carries this variable: what is left of them can be found, however deep.
        self.marker = uuid.uuid4().hex
        self.env = child_env(PIXTRAL_CACHE_DIR=str(tmp_path / "cache"), LAUNCHER_TEST_MARKER=self.marker, **env)
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.launcher", "--model", str(tiny_model), "--port", str(self.port),
                 "--http-port", str(self.http_port), *args], cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                stderr=stderr, text=True)

    def wait_ready(self, timeout_s: float = 600) -> None:
        line = self.process.stdout.readline()   # the launcher's stdout carries `ready` first, then `http <url>`
        assert line.strip() == f"ready {self.gateway}", f"{line!r}: {self.stderr()[-3000:]}"
        self.redis_url = re.search(r"--redis (\S+)", " ".join(self.cmdline(self.children()["gateway"]))).group(1)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def plain_lines(self) -> list[str]:
        """pixtral-serve's own lines (the children's are JSON)."""
        return [line for line in self.stderr().splitlines() if not line.startswith("{")]

    def log_entries(self) -> list[dict]:
        return [json.loads(line) for line in self.stderr().splitlines() if line.startswith("{")]

    def metrics_urls(self) -> dict[str, str]:
        return dict(re.findall(r"^metrics (\w+) (http://\S+)$", self.stderr(), re.MULTILINE))

    @staticmethod
    def cmdline(pid: int) -> list[str]:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")

    def children(self) -> dict[str, int]:
        """Name (gateway, decoder0, vision1, redis) -> pid of each child running now."""
        pids = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout.split()
        ports = {url.rsplit(":", 1)[1].split("/")[0]: name for name, url in self.metrics_urls().items()}
        named = {}
        for pid in map(int, pids):
            try:
                argv = self.cmdline(pid)
            except FileNotFoundError:
                continue
            if "redis-server" in argv[0]:
                named["redis"] = pid
            elif argv[argv.index("--metrics-port") + 1] in ports:
                named[ports[argv[argv.index("--metrics-port") + 1]]] = pid
            else:   # --metrics-port 0: named by role, in the order started
                role = argv[argv.index("-m") + 1].removeprefix("services.")
                named[role if role == "gateway" else f"{role}{sum(n.startswith(role) for n in named)}"] = pid
        return named

    def address(self, name: str) -> str:
        argv = self.cmdline(self.children()[name])
        return f"127.0.0.1:{argv[argv.index('--port') + 1]}"

    def left_running(self) -> list[int]:
        """Processes carrying this launcher's marker that still run (zombies aside)."""
        left = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and int(proc.name) != os.getpid() and \
                        f"LAUNCHER_TEST_MARKER={self.marker}".encode() in (proc / "environ").read_bytes() and \
                        "zombie" not in (proc / "status").read_text():
                    left.append(int(proc.name))
            except OSError:
                pass
        return left

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.left_running():   # only after a failed test: never leave processes running
            os.kill(pid, signal.SIGKILL)


def text_chat(text: str, max_tokens: int, seed: int = 0):
    return chat_request([("user", [text])], max_tokens=max_tokens, temperature=1.0, seed=seed)


def image_chat(max_tokens: int = 4):
    """A chat with an image not seen before: it needs a vision worker."""
    image = image_bytes(noise_image(48, 32, seed=next(_seeds)))
    return chat_request([("user", ["What is it?", image])], max_tokens=max_tokens, temperature=0.0)


def assert_streamed_to_its_end(stream: BackgroundChat, num_tokens: int) -> None:
    outcome = stream.result(timeout_s=300)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert outcome.last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(outcome.token_ids) == outcome.last.usage.completion_tokens == num_tokens


def metrics_page(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as page:
        return page.read().decode()


def restarts(serve: Serve, name: str) -> list[tuple[int, str]]:
    """(pid that died, how) for each restart line of `name`."""
    found = [RESTART_LINE.match(line) for line in serve.plain_lines()]
    return [(int(m[2]), m[3]) for m in found if m and m[1] == name]


@pytest.fixture(scope="module")
def serve(tiny_model, tmp_path_factory):
    running = Serve(tmp_path_factory.mktemp("serve"), tiny_model, "--redis", "private", "--decoders", "2",
                    "--vision-workers", "2", "--metrics-port", str(free_ports(5)))
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()
    assert not running.left_running()


def test_every_childs_metrics_page_answers_on_the_ports_after_the_gateways(serve):
    urls = serve.metrics_urls()
    assert list(urls) == ["gateway", "decoder0", "decoder1", "vision0", "vision1"]
    ports = [int(url.rsplit(":", 1)[1].split("/")[0]) for url in urls.values()]
    assert ports == list(range(ports[0], ports[0] + 5))
    for name, url in urls.items():
        role = re.sub(r"\d+$", "", name)
        assert f"pixtral_{role}_" in metrics_page(url), name


def test_a_killed_vision_worker_and_a_killed_decoder_come_back_while_the_others_serve(serve):
    before = serve.children()
    addresses = {name: serve.address(name) for name in ("decoder0", "decoder1", "vision0")}
    stream = BackgroundChat(serve.gateway, text_chat("Tell me a long story.", LONG_STREAM_TOKENS), timeout_s=300)
    stream.wait_tokens(5)
    urls = serve.metrics_urls()
    idle = next(name for name in ("decoder0", "decoder1")
                if metric_value(metrics_page(urls[name]), "pixtral_decoder_running_requests") == 0)
    os.kill(before[idle], signal.SIGKILL)
    os.kill(before["vision0"], signal.SIGKILL)
    # The other decoder and the other vision worker answer at once, while the stream goes on.
    answer = call_chat(serve.gateway, image_chat(), timeout_s=120)
    assert answer.code == grpc.StatusCode.OK, answer.details
    assert answer.last.usage.encoded_images == 1
    assert stream.num_tokens < LONG_STREAM_TOKENS, "the stream ended before the chat was answered"
    wait_until(lambda: restarts(serve, idle) and restarts(serve, "vision0"), 30, "no restart line")
    assert restarts(serve, idle) == [(before[idle], "was killed by SIGKILL")]
    assert restarts(serve, "vision0") == [(before["vision0"], "was killed by SIGKILL")]
    # Back on the same ports, as new processes.
    for name in (idle, "vision0"):
        wait_until(lambda: health_status(addresses[name]) == SERVING, 300, f"{name} not serving again")
        assert serve.children()[name] != before[name] and serve.address(name) == addresses[name]
    assert_streamed_to_its_end(stream, LONG_STREAM_TOKENS)
    # The restarted decoder takes requests again (the gateway balances chats over both) and so does the restarted
    # vision worker (each new image's job goes to one of the two); their metrics pages answer too.
    def served_by_both() -> bool:
        assert call_chat(serve.gateway, image_chat(), timeout_s=120).code == grpc.StatusCode.OK
        return metric_value(metrics_page(urls[idle]), "pixtral_decoder_generated_tokens_total") > 0 and \
            metric_value(metrics_page(urls["vision0"]), "pixtral_vision_encoded_images_total") > 0
    wait_until(served_by_both, 120, "the restarted decoder or vision worker takes no work", interval_s=0)
    assert {name for name in serve.children()} == {"gateway", "decoder0", "decoder1", "vision0", "vision1", "redis"}


def test_a_killed_private_redis_comes_back_empty_on_its_port_and_the_service_answers_again(serve):
    request = image_chat()
    assert call_chat(serve.gateway, request, timeout_s=120).last.usage.encoded_images == 1
    assert call_chat(serve.gateway, request, timeout_s=120).last.usage.cached_images == 1
    before = serve.children()["redis"]
    os.kill(before, signal.SIGKILL)
    wait_until(lambda: restarts(serve, "redis"), 30, "no restart line for redis")
    assert restarts(serve, "redis") == [(before, "was killed by SIGKILL")]
    wait_until(lambda: redis_answers(serve.redis_url), 30, "Redis is not back on its port")

    def answered():
        outcome = call_chat(serve.gateway, request, timeout_s=60)
        return outcome if outcome.code == grpc.StatusCode.OK else None
    outcome = wait_until(answered, 120, "the service does not answer after Redis came back", interval_s=0.5)
    assert outcome.last.usage.encoded_images == 1, "the cache should have come back empty"
    assert serve.children()["redis"] != before


def test_a_child_that_keeps_crashing_ends_pixtral_serve_with_status_1_and_stops_everything(tiny_model, tmp_path):
    # Every decoder start fails on a bad setting it reads from the environment pixtral-serve forwards.
    serve = Serve(tmp_path, tiny_model, "--redis", "private", "--metrics-port", "0", "--max-restarts", "2",
                  "--restart-window-s", "600", "--restart-backoff-s", "0.1", PIXTRAL_MAX_FORWARD_FAILURES="0")
    try:
        assert serve.process.wait(timeout=600) == 1
    finally:
        serve.stop()
    lines = serve.plain_lines()
    assert [how for _, how in restarts(serve, "decoder0")] == ["exited with status 2"] * 2, lines
    assert re.search(r"^pixtral-serve: decoder0 \(pid \d+\) exited with status 2: 3 crashes within 600 s, more "
                     r"than --max-restarts 2; stopping every role$", serve.stderr(), re.MULTILINE), lines
    assert serve.process.stdout.read() == "", "it never got ready"
    assert not serve.left_running()


def test_sigterm_drains_the_gateway_first_then_the_workers_then_redis(tiny_model, tmp_path):
    # Each encode takes 3 s (the vision workers' test-only fault flag, through the environment), so that a request
    # is still waiting for its image when the gateway starts draining.
    serve = Serve(tmp_path, tiny_model, "--redis", "private", "--metrics-port", "0", "--drain-grace-s", "120",
                  PIXTRAL_FAULT_ENCODE_DELAY_S="3")
    try:
        serve.wait_ready()
        client = redis.Redis.from_url(serve.redis_url)
        stream = BackgroundChat(serve.gateway, text_chat("Tell me a long story.", LONG_STREAM_TOKENS), timeout_s=300)
        waiting = BackgroundChat(serve.gateway, image_chat(), timeout_s=300)
        stream.wait_tokens(5)
        wait_until(lambda: pending_jobs(client), 60, "the image's job was never taken")
        children = serve.children()
        serve.process.send_signal(signal.SIGTERM)
        assert_streamed_to_its_end(stream, LONG_STREAM_TOKENS)
        image_outcome = waiting.result(timeout_s=300)
        assert image_outcome.code == grpc.StatusCode.OK, image_outcome.details
        assert serve.process.wait(timeout=300) == 0
    finally:
        serve.stop()
    assert not serve.left_running()
    entries = serve.log_entries()
    by_role = {role: [e for e in entries if e["role"] == role] for role in ("gateway", "decoder", "vision")}
    gateway_draining = next(e["ts"] for e in by_role["gateway"] if e["msg"].startswith("draining"))
    gateway_last = by_role["gateway"][-1]["ts"]
    decoder_draining = next(e["ts"] for e in by_role["decoder"] if e["msg"].startswith("draining"))
    vision_left = next(e["ts"] for e in by_role["vision"] if e["msg"] == "left the consumer group")
    # The stream and the encode ended inside the gateway's drain, before the others were told to stop.
    chats = [e for e in by_role["gateway"] if e["msg"].startswith("Chat OK")]
    assert len(chats) >= 2 and all(gateway_draining <= e["ts"] <= gateway_last for e in chats[-2:])
    assert gateway_last <= decoder_draining and gateway_last <= vision_left
    # The vision worker left the group (a Redis command) after its drain: Redis was still up then.
    assert set(children) == {"gateway", "decoder0", "vision0", "redis"}


def test_the_decoders_take_the_precision_flags_and_serve_an_image_chat(tiny_model, tmp_path):
    serve = Serve(tmp_path, tiny_model, "--redis", "private", "--metrics-port", "0", "--quantization", "fp8",
                  "--kv-cache-dtype", "fp8")
    try:
        serve.wait_ready()
        argv = serve.cmdline(serve.children()["decoder0"])
        assert argv[argv.index("--quantization") + 1] == "fp8" and argv[argv.index("--kv-cache-dtype") + 1] == "fp8"
        outcome = call_chat(serve.gateway, image_chat(max_tokens=4))
        assert outcome.code == grpc.StatusCode.OK and len(outcome.token_ids) == 4, outcome.details
    finally:
        serve.stop()
    assert not serve.left_running()
