"""The decoder and gateway under load, faults and shutdown (reliability cases 22-24):

- load above capacity: admission control refuses the excess with RESOURCE_EXHAUSTED at once, the admitted requests
  keep their pace, memory stays bounded;
- a forward pass that fails mid-batch (test-only fault flag): every stream of the batch ends UNAVAILABLE, with a
  final finish_reason ERROR where tokens were sent; the decoder is NOT_SERVING, then recovers, or, when it keeps
  failing, exits for its supervisor;
- SIGTERM: NOT_SERVING at once, new calls refused with UNAVAILABLE, streams in flight finish within the grace
  period (and are cut after it).

One decoder with a small batch (4 sequences + 4 queued) behind the module's gateway, on a Redis of its own.
"""

from __future__ import annotations

import concurrent.futures
import signal
import statistics
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from pixtral.v1 import common_pb2
from tests.reference import chat_request
from tests.support import (BackgroundChat, Stack, call_chat, decoder_load, health_status, metric_value,
                           wait_decoder_idle, wait_until)

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
MAX_NUM_SEQS, MAX_QUEUED = 4, 4
LONG = 4000   # tokens: far longer than any test waits


def long_chat(index: int, max_tokens: int = LONG, request_id: str = ""):
    request = chat_request([("user", [f"Story {index}, please."])], max_tokens=max_tokens, temperature=1.0,
                           seed=index)
    request.request_id = request_id
    return request


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("decoder-fault") / "fail-forward"


@pytest.fixture(scope="module")
def stack(tiny_model, module_redis, tmp_path_factory, fault_file):
    running = Stack(tiny_model, module_redis.url, tmp_path_factory.mktemp("decoder-lifecycle"), num_vision=0,
                    with_metrics=True,
                    decoder_args=("--max-num-seqs", str(MAX_NUM_SEQS), "--max-queued", str(MAX_QUEUED),
                                  "--fault-forward-file", str(fault_file), "--max-forward-failures", "1000",
                                  "--drain-grace-s", "10"),
                    gateway_args=("--health-check-interval-s", "0.2")).start()
    yield running
    running.stop()


# -- case 23: load above capacity -------------------------------------------------------------------------------

def run_wave(gateway: str, count: int, max_tokens: int):
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda i: call_chat(gateway, long_chat(i, max_tokens, f"wave-{i}"), 120), range(count)))


def time_per_token(outcomes) -> float:
    return statistics.median(o.time_per_token for o in outcomes if o.code == grpc.StatusCode.OK)


def test_load_above_capacity_is_refused_quickly_and_admitted_requests_keep_their_pace(stack):
    wait_decoder_idle(stack, 5)
    capacity = MAX_NUM_SEQS + MAX_QUEUED
    at_capacity = run_wave(stack.gateway, capacity, 48)
    assert [o.code for o in at_capacity] == [grpc.StatusCode.OK] * capacity
    peak_before = stack.peak_rss_bytes("decoder0")

    overload = run_wave(stack.gateway, 6 * capacity, 48)
    admitted = [o for o in overload if o.code == grpc.StatusCode.OK]
    refused = [o for o in overload if o.code != grpc.StatusCode.OK]
    assert {o.code for o in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}, {o.details for o in refused}
    assert len(refused) >= 3 * capacity and len(admitted) >= capacity, (len(admitted), len(refused))
    for outcome in refused:
        assert "decoder queue is full" in outcome.details and outcome.request_id.startswith("wave-")
    assert max(o.seconds for o in refused) < 3, "refusals are not quick"
    assert all(len(o.token_ids) == 48 for o in admitted)
    # Admitted requests stream at the pace of a full batch, not slower for the refused ones around them.
    assert time_per_token(admitted) < 2 * time_per_token(at_capacity), (time_per_token(admitted),
                                                                         time_per_token(at_capacity))
    assert stack.peak_rss_bytes("decoder0") - peak_before < 100 << 20
    wait_decoder_idle(stack, 5)


# -- case 22: a fault in the forward pass -------------------------------------------------------------------------

def test_a_forward_fault_mid_batch_ends_every_stream_unavailable_and_the_decoder_recovers(stack, fault_file):
    wait_decoder_idle(stack, 5)
    decoder = stack.decoders[0]
    streams = [BackgroundChat(stack.gateway, long_chat(i, request_id=f"faulted-{i}")) for i in range(3)]
    for stream in streams:
        stream.wait_tokens(3)
    fault_file.touch()
    try:
        for index, stream in enumerate(streams):
            outcome = stream.result(timeout_s=10)
            assert outcome.code == grpc.StatusCode.UNAVAILABLE, (outcome.code, outcome.details)
            assert outcome.request_id == f"faulted-{index}"
            assert outcome.last.finish_reason == common_pb2.FINISH_REASON_ERROR
            assert outcome.last.usage.completion_tokens == len(outcome.token_ids) >= 3
        wait_until(lambda: health_status(decoder) == NOT_SERVING, 5, "the decoder still reports SERVING")
        assert health_status(decoder, "liveness") == SERVING
        page = stack.metrics("decoder0")
        assert metric_value(page, "pixtral_decoder_failed_steps_total") >= 1
        assert metric_value(page, "pixtral_decoder_engine_healthy") == 0
        load = decoder_load(stack)
        assert (load["running_requests"], load["kv_cache_usage_ratio"]) == (0, 0), load
        # While it fails, a request fails fast too (before any token: no final message).
        during = call_chat(stack.gateway, long_chat(9, 8), 20)
        assert during.code == grpc.StatusCode.UNAVAILABLE and during.seconds < 5 and not during.responses
    finally:
        fault_file.unlink(missing_ok=True)
    wait_until(lambda: health_status(decoder) == SERVING, 10, "the decoder did not recover")
    wait_decoder_idle(stack, 5)
    after = call_chat(stack.gateway, long_chat(10, 8), 30)
    assert after.code == grpc.StatusCode.OK and after.last.finish_reason == common_pb2.FINISH_REASON_LENGTH


# -- case 24: SIGTERM ---------------------------------------------------------------------------------------------

def test_sigterm_on_a_gateway_refuses_new_calls_and_lets_its_streams_finish(stack):
    gateway = stack.start_gateway("gateway-drained", ("--drain-grace-s", "20"))
    streams = [BackgroundChat(gateway, long_chat(20 + i, 160)) for i in range(2)]
    for stream in streams:
        stream.wait_tokens(2)
    stack.processes["gateway-drained"].send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_until(lambda: health_status(gateway) == NOT_SERVING, 3, "health is not NOT_SERVING at once")
    refused = call_chat(gateway, long_chat(30, 4), 10)
    assert refused.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.details, refused
    assert health_status(gateway) == NOT_SERVING, "health stopped answering while streams were still draining"
    for stream in streams:
        outcome = stream.result(timeout_s=30)
        assert outcome.code == grpc.StatusCode.OK, outcome.details
        assert outcome.last.finish_reason == common_pb2.FINISH_REASON_LENGTH and len(outcome.token_ids) == 160
    # It exits once its streams are done, not at the end of the grace period.
    assert stack.processes["gateway-drained"].wait(timeout=10) == 0
    assert time.monotonic() - signalled < 15
    wait_decoder_idle(stack, 5)


def test_a_stream_longer_than_the_grace_period_is_cut_and_leaves_nothing(stack):
    gateway = stack.start_gateway("gateway-cut", ("--drain-grace-s", "1"))
    stream = BackgroundChat(gateway, long_chat(40))
    stream.wait_tokens(2)
    stack.processes["gateway-cut"].send_signal(signal.SIGTERM)
    outcome = stream.result(timeout_s=10)
    assert outcome.code != grpc.StatusCode.OK and outcome.seconds < 10
    assert stack.processes["gateway-cut"].wait(timeout=10) == 0
    wait_decoder_idle(stack, 5)


def test_sigterm_on_a_decoder_finishes_its_streams_and_refuses_new_ones(stack):
    decoder = stack.decoders[0]
    streams = [BackgroundChat(stack.gateway, long_chat(50 + i, 160)) for i in range(2)]
    for stream in streams:
        stream.wait_tokens(2)
    stack.processes["decoder0"].send_signal(signal.SIGTERM)
    wait_until(lambda: health_status(decoder) == NOT_SERVING, 3, "health is not NOT_SERVING at once")
    refused = call_chat(stack.gateway, long_chat(60, 4), 10)
    assert refused.code == grpc.StatusCode.UNAVAILABLE, refused   # its only decoder is draining
    for stream in streams:
        outcome = stream.result(timeout_s=30)
        assert outcome.code == grpc.StatusCode.OK, outcome.details
        assert len(outcome.token_ids) == 160
    assert stack.processes["decoder0"].wait(timeout=10) == 0


def test_a_decoder_whose_forward_passes_keep_failing_exits_for_its_supervisor(stack, fault_file):
    """Last: it restarts the module's decoder with other flags."""
    decoder = stack.decoders[0]
    if stack.processes["decoder0"].poll() is None:
        stack.stop_process("decoder0")
    stack.restart_process("decoder0", decoder, ("--max-forward-failures", "3"))
    fault_file.touch()
    codes = []

    def has_exited() -> bool:
        # Requests until it exits (the gateway's channel may still be reconnecting to the restarted decoder).
        codes.append(call_chat(stack.gateway, long_chat(70, 8), 20).code)
        return stack.processes["decoder0"].poll() is not None

    try:
        wait_until(has_exited, 30, "the decoder kept running")
        assert stack.processes["decoder0"].returncode == 1
        assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
        assert "forward passes failed in a row" in stack.logs("decoder0")
    finally:
        fault_file.unlink(missing_ok=True)
    stack.restart_process("decoder0", decoder)   # as its supervisor would
    wait_until(lambda: call_chat(stack.gateway, long_chat(71, 8), 20).code == grpc.StatusCode.OK, 20,
               "the gateway does not serve through the restarted decoder")
