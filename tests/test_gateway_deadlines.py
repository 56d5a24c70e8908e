"""Deadlines and cancellation (reliability cases 20-21): the client's deadline bounds the work downstream, and work
nobody waits for stops: the decoder's running and waiting requests and its KV cache go back to zero at once."""

from __future__ import annotations

import time

import grpc
import pytest

from pixtral.v1 import gateway_pb2_grpc
from tests.reference import chat_request
from tests.support import Stack, metric_value

# At the tiny model's ~150 tokens/s on CPU, this many tokens take half a minute: far longer than any wait below.
LONG = 4000


def decoder_load(stack: Stack) -> tuple[float, float, float, float]:
    page = stack.metrics("decoder0")
    return tuple(metric_value(page, name) for name in (
        "pixtral_decoder_running_requests", "pixtral_decoder_waiting_requests",
        "pixtral_decoder_kv_cache_usage_ratio", "pixtral_decoder_generated_tokens_total"))


def wait_idle(stack: Stack, timeout_s: float) -> float:
    """Seconds until the decoder runs nothing, queues nothing and holds no KV block; fails after timeout_s."""
    started = time.monotonic()
    while True:
        running, waiting, kv_usage, _ = decoder_load(stack)
        if (running, waiting, kv_usage) == (0, 0, 0):
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"decoder still busy: {running=} {waiting=} {kv_usage=}"
        time.sleep(0.05)


def assert_nothing_keeps_generating(stack: Stack, tokens_before: float) -> None:
    tokens = decoder_load(stack)[3]
    assert 0 < tokens - tokens_before < LONG, "the request never ran, or ran to its end"
    time.sleep(0.5)
    assert decoder_load(stack)[3] == tokens
    assert metric_value(stack.metrics("gateway"), "pixtral_gateway_chats_in_flight") == 0


def test_short_deadline_is_deadline_exceeded_and_leaves_no_work_in_the_decoder(observed_stack):
    wait_idle(observed_stack, 10)
    tokens_before = decoder_load(observed_stack)[3]
    request = chat_request([("user", ["Tell me a long story."])], max_tokens=LONG, temperature=1.0, seed=3)
    request.request_id = "short-deadline"
    started = time.monotonic()
    with grpc.insecure_channel(observed_stack.gateway) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=1.5))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3
    assert wait_idle(observed_stack, 5) < 5
    assert_nothing_keeps_generating(observed_stack, tokens_before)
    # The decoder's call ended with the client's (the gateway passed the remaining time and cancelled its call).
    ends = [entry for entry in observed_stack.log_entries("decoder0")
            if entry.get("request_id") == "short-deadline" and entry["msg"].startswith("Generate ")]
    assert ends and ends[-1]["msg"].split()[1] in ("CANCELLED", "DEADLINE_EXCEEDED"), ends


def test_client_cancel_mid_stream_frees_the_decoder_at_once(observed_stack):
    wait_idle(observed_stack, 10)
    tokens_before = decoder_load(observed_stack)[3]
    request = chat_request([("user", ["Another long story."])], max_tokens=LONG, temperature=1.0, seed=4)
    with grpc.insecure_channel(observed_stack.gateway) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=60)
        for _, _ in zip(range(5), call):
            pass   # a few deltas: it is generating
        assert decoder_load(observed_stack)[0] == 1
        call.cancel()
    assert wait_idle(observed_stack, 5) < 5
    assert_nothing_keeps_generating(observed_stack, tokens_before)


def test_many_concurrent_deadlines_leave_nothing_behind(observed_stack):
    wait_idle(observed_stack, 10)
    request = chat_request([("user", ["Go on and on."])], max_tokens=LONG, temperature=1.0)
    with grpc.insecure_channel(observed_stack.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        calls = [stub.Chat(request, timeout=0.5 + 0.1 * index) for index in range(8)]
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                list(call)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(observed_stack, 5)
