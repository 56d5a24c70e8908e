"""Redis slow, stalled, cut off, down and back empty (reliability case 19).

Every role reaches Redis through a TCP proxy of the test's, on a Redis of the module's own. Requests that need
Redis fail fast with UNAVAILABLE inside their deadline while it is away (or succeed once reconnected); readiness
goes NOT_SERVING while it is away and back to SERVING after, liveness never moves; after an empty restart the
consumer group is there again and images are encoded again.
"""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from shared import encode_jobs
from shared.images import sha256_hex
from tests.reference import chat_request
from tests.support import (Stack, TcpProxy, assert_nothing_left, call_chat, health_status, image_bytes,
                           noise_image, pending_jobs, wait_until)

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
REDIS_TIMEOUT = ("--redis-timeout-s", "1")
# An image the worker takes and never finishes (test-only fault flag): a request for it waits on the pool.
STUCK_IMAGE = image_bytes(noise_image(48, 32, seed=9100))


def image_chat(seed: int, max_tokens: int = 4):
    return chat_request([("user", ["What is it?", image_bytes(noise_image(32, 48, seed=seed))])],
                        max_tokens=max_tokens, temperature=0.0)


@pytest.fixture(scope="module")
def proxy(module_redis):
    running = TcpProxy(module_redis.port)
    yield running
    running.close()


@pytest.fixture(scope="module")
def stack(tiny_model, proxy, tmp_path_factory):
    running = Stack(tiny_model, proxy.url, tmp_path_factory.mktemp("redis-faults"), with_metrics=True,
                    gateway_args=REDIS_TIMEOUT, decoder_args=REDIS_TIMEOUT,
                    vision_args=(*REDIS_TIMEOUT, "--read-block-ms", "200", "--max-deliveries", "1000",
                                 "--fault-encode-fail-sha256", sha256_hex(STUCK_IMAGE))).start()
    yield running
    running.stop()


def addresses(stack: Stack) -> list[str]:
    return [stack.gateway, *stack.decoders, *stack.vision]


def wait_health(stack: Stack, status: int, timeout_s: float = 10.0) -> None:
    wait_until(lambda: all(health_status(address) == status for address in addresses(stack)), timeout_s,
               f"health {[health_status(address) for address in addresses(stack)]}, wanted {status}")


def assert_alive(stack: Stack) -> None:
    assert [health_status(address, "liveness") for address in addresses(stack)] == [SERVING] * 3


def test_a_slow_redis_slows_requests_down_but_they_succeed(stack, proxy, module_redis):
    proxy.delay_s = 0.05
    try:
        outcome = call_chat(stack.gateway, image_chat(9001), 30)
    finally:
        proxy.delay_s = 0.0
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert outcome.last.usage.encoded_images == 1
    wait_health(stack, SERVING)
    assert_nothing_left(stack, module_redis.client())


def test_a_stalled_redis_fails_requests_fast_and_readiness_follows(stack, proxy, module_redis):
    proxy.stall()
    try:
        outcome = call_chat(stack.gateway, image_chat(9002), 20)
        assert outcome.code == grpc.StatusCode.UNAVAILABLE, (outcome.code, outcome.details)
        assert outcome.seconds < 3, f"took {outcome.seconds:.1f} s"   # the 1 s Redis timeout, not the deadline
        assert "embedding cache unreachable" in outcome.details
        wait_health(stack, NOT_SERVING)
        assert_alive(stack)
        # A text-only chat needs no Redis: the decoders are tried although none is ready, and it is served.
        text = call_chat(stack.gateway, chat_request([("user", ["Hello"])], max_tokens=3), 20)
        assert text.code == grpc.StatusCode.OK, text.details
    finally:
        proxy.resume()
    wait_health(stack, SERVING)
    outcome = call_chat(stack.gateway, image_chat(9003), 30)
    assert outcome.code == grpc.StatusCode.OK and outcome.last.usage.encoded_images == 1
    assert_nothing_left(stack, module_redis.client())


def test_connections_cut_under_the_roles_are_opened_again(stack, proxy, module_redis):
    for seed in (9004, 9005):
        proxy.cut()
        outcome = call_chat(stack.gateway, image_chat(seed), 30)
        assert outcome.code == grpc.StatusCode.OK, outcome.details
        assert outcome.last.usage.encoded_images == 1
    wait_health(stack, SERVING)
    assert_nothing_left(stack, module_redis.client())


def test_redis_down_fails_waiting_requests_fast_and_an_empty_restart_is_recovered(stack, proxy, module_redis):
    """Last: it empties the module's Redis."""
    client = module_redis.client()
    stuck = chat_request([("user", ["Stuck:", STUCK_IMAGE])], max_tokens=4)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(call_chat, stack.gateway, stuck, 30)
        wait_until(lambda: pending_jobs(client) == 1, 10, "the worker never took the stuck job")
        time.sleep(0.3)   # the request is waiting on the pool now
        module_redis.process.terminate()
        module_redis.process.wait(timeout=10)
        stopped = time.monotonic()
        outcome = waiting.result()
    try:
        assert outcome.code == grpc.StatusCode.UNAVAILABLE, (outcome.code, outcome.details)
        assert time.monotonic() - stopped < 5 and outcome.seconds < 15
        fresh = call_chat(stack.gateway, image_chat(9006), 20)
        assert fresh.code == grpc.StatusCode.UNAVAILABLE and fresh.seconds < 5, (fresh.code, fresh.seconds)
        wait_health(stack, NOT_SERVING)
        assert_alive(stack)
    finally:
        module_redis.start()   # the same port, empty
    wait_health(stack, SERVING)
    wait_until(lambda: client.exists(encode_jobs.STREAM) and any(
        group["name"] == encode_jobs.GROUP.encode() for group in client.xinfo_groups(encode_jobs.STREAM)),
        10, "the consumer group was not recreated")
    outcome = call_chat(stack.gateway, image_chat(9007), 30)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert outcome.last.usage.encoded_images == 1
    assert_nothing_left(stack, client)
