"""Several decoders behind one gateway: least-outstanding balancing, health watching (an unhealthy decoder is
skipped until it is healthy again), retry of a decoder that is UNAVAILABLE before its first token.

The pool's logic is tested against in-process decoders on real gRPC servers (health, auth and all); the whole
thing against separate processes, one of them killed and started again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import time

import grpc
import pytest

from pixtral.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, gateway_pb2_grpc
from services.gateway.decoders import DecoderPool
from shared.errors import Unavailable
from shared.generation import GenerateRequest
from shared.sampling import SamplingParams
from shared.grpc_server import GrpcServer
from tests.reference import chat_request
from tests.support import Stack

TOKEN = "internal-secret"


class FakeDecoder(decoder_pb2_grpc.DecoderServicer):
    """Streams [7] then [8] with finish_reason LENGTH; or fails UNAVAILABLE before or after the first token, with
    a final finish_reason ERROR first (as a decoder whose forward pass failed does) or without."""

    def __init__(self) -> None:
        self.num_calls = 0
        self.fails = ""   # "", "before", "after", "error_before" or "error_after"

    async def Generate(self, request, context):
        self.num_calls += 1
        if self.fails.startswith("error") and self.fails.endswith("before"):
            yield decoder_pb2.GenerateResponse(finish_reason=common_pb2.FINISH_REASON_ERROR)
        if self.fails.endswith("before"):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        yield decoder_pb2.GenerateResponse(token_ids=[7])
        if self.fails == "error_after":
            yield decoder_pb2.GenerateResponse(finish_reason=common_pb2.FINISH_REASON_ERROR)
        if self.fails.endswith("after"):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "died mid-stream")
        await asyncio.sleep(0.01)
        yield decoder_pb2.GenerateResponse(token_ids=[8], finish_reason=common_pb2.FINISH_REASON_LENGTH)


REQUEST = GenerateRequest(request_id="pool-test", prompt_token_ids=[1, 3, 22177, 4], images=[],
                          sampling=SamplingParams(max_tokens=2))


async def started_fakes(count: int) -> list[tuple[GrpcServer, FakeDecoder]]:
    fakes = []
    for _ in range(count):
        server, fake = GrpcServer("127.0.0.1:0", auth_token=TOKEN), FakeDecoder()
        server.add(decoder_pb2_grpc.add_DecoderServicer_to_server, fake, "pixtral.v1.Decoder")
        await server.start()
        await server.set_serving(True)
        fakes.append((server, fake))
    return fakes


async def collect(pool: DecoderPool) -> list[int]:
    return [token for output in [o async for o in pool.generate(REQUEST, 5.0)] for token in output.token_ids]


async def until(predicate, timeout_s: float = 5.0) -> None:
    give_up = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < give_up, "condition not reached"
        await asyncio.sleep(0.02)


def run_with_pool(scenario, num_decoders: int = 2, token: str = TOKEN) -> None:
    async def main():
        fakes = await started_fakes(num_decoders)
        pool = DecoderPool(tuple(f"127.0.0.1:{server.port}" for server, _ in fakes), token=token,
                           health_retry_s=0.1, routing="least-busy")   # these tests count calls spread in turn
        await pool.start()
        try:
            await scenario(pool, fakes)
        finally:
            await pool.close()
            for server, _ in fakes:
                await server.stop(0)
    asyncio.run(main())


def test_unhealthy_decoder_is_skipped_until_healthy_again():
    async def scenario(pool, fakes):
        (server_a, fake_a), (_, fake_b) = fakes
        await server_a.set_serving(False)
        await until(lambda: not pool.decoders[0].is_healthy)
        for _ in range(6):
            assert await collect(pool) == [7, 8]
        assert (fake_a.num_calls, fake_b.num_calls) == (0, 6)
        await server_a.set_serving(True)
        await until(lambda: pool.decoders[0].is_healthy)
        for _ in range(6):
            assert await collect(pool) == [7, 8]
        assert fake_a.num_calls >= 2
    run_with_pool(scenario)


def test_a_stopped_decoder_is_marked_unhealthy_by_its_health_watch():
    async def scenario(pool, fakes):
        (server_a, _), (_, fake_b) = fakes
        await until(lambda: all(decoder.is_healthy for decoder in pool.decoders))
        await server_a.stop(0)
        await until(lambda: not pool.decoders[0].is_healthy)
        for _ in range(4):
            assert await collect(pool) == [7, 8]
        assert fake_b.num_calls == 4
    run_with_pool(scenario)


def test_unavailable_before_the_first_token_is_retried_on_another_decoder():
    async def scenario(pool, fakes):
        (_, fake_a), (_, fake_b) = fakes
        fake_a.fails = "before"   # healthy by its health service, failing its calls (e.g. shutting down)
        for _ in range(4):
            assert await collect(pool) == [7, 8]
        assert fake_a.num_calls >= 1 and fake_b.num_calls == 4
    run_with_pool(scenario)


@pytest.mark.parametrize("fails", ["after", "error_after"])
def test_unavailable_after_a_token_is_not_retried(fails):
    async def scenario(pool, fakes):
        (_, fake_a), = fakes
        fake_a.fails = fails
        outputs = []
        with pytest.raises(Unavailable):
            async for output in pool.generate(REQUEST, 5.0):
                outputs.append(output.token_ids)
        assert outputs == [[7]] and fake_a.num_calls == 1   # the ERROR message is not passed on as an output
    run_with_pool(scenario, num_decoders=1)


def test_a_forward_failure_before_the_first_token_is_retried_on_another_decoder():
    async def scenario(pool, fakes):
        (_, fake_a), (_, fake_b) = fakes
        fake_a.fails = "error_before"
        for _ in range(4):
            assert await collect(pool) == [7, 8]
        assert fake_a.num_calls >= 1 and fake_b.num_calls == 4
    run_with_pool(scenario)


def test_when_no_decoder_is_healthy_all_are_tried_and_a_dead_one_is_unavailable():
    async def scenario(pool, fakes):
        (server_a, fake_a), = fakes
        await server_a.set_serving(False)   # e.g. its Redis is away: health lags behind, so it is tried anyway
        await until(lambda: not pool.decoders[0].is_healthy)
        assert await collect(pool) == [7, 8] and fake_a.num_calls == 1
        await server_a.stop(0)
        with pytest.raises(Unavailable, match="decoder unavailable: UNAVAILABLE"):
            await collect(pool)
    run_with_pool(scenario, num_decoders=1)


def test_a_wrong_internal_token_is_refused_by_the_decoder():
    async def scenario(pool, fakes):
        with pytest.raises(Unavailable, match="UNAUTHENTICATED"):
            await collect(pool)
        assert fakes[0][1].num_calls == 0
    run_with_pool(scenario, num_decoders=1, token="not-the-token")


# -- the whole thing: two decoder processes, one killed ----------------------------------------------------------

def chat_tokens(gateway: str, index: int) -> int:
    request = chat_request([("user", [f"Request {index}"])], max_tokens=8, temperature=0.0)
    with grpc.insecure_channel(gateway) as channel:
        last = list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=60))[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    return last.usage.completion_tokens


def served_by(stack: Stack, name: str) -> int:
    return sum(1 for entry in stack.log_entries(name) if entry["msg"].startswith("Generate OK"))


def test_two_decoders_one_killed_and_started_again(tiny_model, redis_server, tmp_path_factory):
    stack = Stack(tiny_model, redis_server.url, tmp_path_factory.mktemp("two-decoders"), num_vision=0,
                  num_decoders=2, gateway_args=("--health-check-interval-s", "0.2", "--routing", "least-busy")).start()
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda i: chat_tokens(stack.gateway, i), range(8))) == [8] * 8
        assert served_by(stack, "decoder0") >= 1 and served_by(stack, "decoder1") >= 1

        stack.stop_process("decoder0", signal.SIGKILL)
        before = served_by(stack, "decoder1")
        for index in range(6):   # right after the kill: none of them may fail
            assert chat_tokens(stack.gateway, index) == 8
        assert served_by(stack, "decoder1") == before + 6
        gateway_log = stack.logs("gateway")
        assert f"decoder {stack.decoders[0]} unhealthy: skipped" in gateway_log

        stack.restart_process("decoder0", stack.decoders[0])
        give_up = time.monotonic() + 20
        while f"decoder {stack.decoders[0]} healthy again" not in stack.logs("gateway"):
            assert time.monotonic() < give_up, "the gateway never took the restarted decoder back"
            time.sleep(0.1)
        before = served_by(stack, "decoder0")
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda i: chat_tokens(stack.gateway, i), range(8))) == [8] * 8
        assert served_by(stack, "decoder0") > before

        # A decoder told to stop is not held up by the gateway's health watch (it waits for open calls).
        started = time.monotonic()
        stack.stop_process("decoder1")
        assert time.monotonic() - started < 5
        assert chat_tokens(stack.gateway, 0) == 8
    finally:
        stack.stop()


def test_a_dns_name_stands_for_every_address_it_resolves_to(monkeypatch):
    """A headless Service name gives one channel per decoder pod, updated as pods come and go."""
    import asyncio
    import socket

    from services.gateway.decoders import DecoderPool

    answers = [["10.0.0.1", "10.0.0.2"], ["10.0.0.2", "10.0.0.3"], OSError("temporary failure")]

    async def scenario():
        loop = asyncio.get_running_loop()

        async def fake_getaddrinfo(host, port, type=0):
            assert (host, port, type) == ("decoders.ns.svc", 50061, socket.SOCK_STREAM)
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answer]

        monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
        pool = DecoderPool(("dns:///decoders.ns.svc:50061", "127.0.0.1:1"), discovery_interval_s=3600)
        await pool.start()
        first = sorted(d.address for d in pool.decoders)
        await pool.discover()
        second = sorted(d.address for d in pool.decoders)
        await pool.discover()   # a DNS failure keeps the decoders known so far
        third = sorted(d.address for d in pool.decoders)
        await pool.close()
        return first, second, third

    first, second, third = asyncio.run(scenario())
    assert first == ["10.0.0.1:50061", "10.0.0.2:50061", "127.0.0.1:1"]
    assert second == ["10.0.0.2:50061", "10.0.0.3:50061", "127.0.0.1:1"]
    assert third == second
