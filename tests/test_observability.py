"""Observability: Prometheus metrics of every role, JSON logs whose request id follows a request through the
gateway, the vision worker and the decoder, health on every server (readiness follows Redis, liveness does not)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pixtral.v1 import gateway_pb2_grpc
from tests.reference import chat_request
from tests.support import assert_status, health_status, image_bytes, metric_value, noise_image, wait_until

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

GATEWAY_METRICS = [
    "pixtral_grpc_requests_total",                          # requests by method and status
    "pixtral_gateway_time_to_first_token_seconds_count",
    "pixtral_gateway_time_per_output_token_seconds_count",
    "pixtral_gateway_generated_tokens_total",               # rate() of it: tokens/s
    "pixtral_gateway_cache_lookups_total",                  # hits and misses
    "pixtral_gateway_images_total",
    "pixtral_gateway_encode_wait_seconds_count",            # encode latency as requests see it
    "pixtral_gateway_chats_in_flight",
]
DECODER_METRICS = [
    "pixtral_grpc_requests_total",
    "pixtral_decoder_running_requests",
    "pixtral_decoder_waiting_requests",                     # queue depth
    "pixtral_decoder_kv_cache_usage_ratio",
    "pixtral_decoder_batch_size",
    "pixtral_decoder_batch_occupancy_ratio",
    "pixtral_decoder_generated_tokens_total",
    "pixtral_decoder_steps_total",
    "pixtral_decoder_prefill_tokens_while_decoding",        # the step-time budget's bound now
]
VISION_METRICS = [
    "pixtral_vision_encode_seconds_count",                  # encode latency of a batch
    "pixtral_vision_batch_images_count",
    "pixtral_vision_encoded_images_total",
    "pixtral_vision_queue_length",                          # queue depth
    "pixtral_vision_queue_pending",
    "pixtral_vision_queue_lag",
]


def has_metric(page: str, name: str) -> bool:
    return any(line.startswith((name + " ", name + "{")) for line in page.splitlines())


@pytest.fixture(scope="module")
def traced(observed_stack):
    """One chat with a new image under a known request id, and one that fails."""
    request = chat_request([("user", ["Trace me:", image_bytes(noise_image(48, 32, seed=500))])], max_tokens=5,
                           temperature=0.0)
    request.request_id = "trace-7f3a"
    with grpc.insecure_channel(observed_stack.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        responses = list(stub.Chat(request, timeout=60))
        bad = chat_request([("user", ["Hi"])], top_p=2.0)
        bad.request_id = "trace-bad"
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Chat(bad, timeout=60))
    assert responses[0].request_id == responses[-1].request_id == "trace-7f3a"
    return caught.value


def test_request_id_follows_the_request_through_every_role(observed_stack, traced):
    for role in ("gateway", "decoder0"):
        def lines() -> list[str]:
            return [entry["msg"] for entry in observed_stack.log_entries(role)
                    if entry.get("request_id") == "trace-7f3a"]

        # a call's last log line may be written after its stream has ended
        wait_until(lambda: any(line.startswith(("Chat OK", "Generate OK")) for line in lines()), 30,
                   f"no {role} log line of the call's end carries the request id: {lines()}")
    gateway_lines = [entry["msg"] for entry in observed_stack.log_entries("gateway")
                     if entry.get("request_id") == "trace-7f3a"]
    assert any(line.startswith("prompt of ") for line in gateway_lines), gateway_lines
    # The encode job carries it to the vision worker, whose log line for the job carries it.
    assert any(entry.get("request_id") == "trace-7f3a" and entry["msg"].startswith("encoded image")
               for entry in observed_stack.log_entries("vision0")), "the vision worker's logs lack the request id"


def test_errors_carry_the_request_id_and_are_counted_by_status(observed_stack, traced):
    assert_status(traced, grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p", request_id="trace-bad")
    assert any(entry.get("request_id") == "trace-bad" and entry["msg"].startswith("Chat INVALID_ARGUMENT")
               for entry in observed_stack.log_entries("gateway"))
    page = observed_stack.metrics("gateway")
    assert metric_value(page, "pixtral_grpc_requests_total", method="Chat", code="INVALID_ARGUMENT") >= 1
    assert metric_value(page, "pixtral_grpc_requests_total", method="Chat", code="OK") >= 1


@pytest.mark.parametrize("role, names", [("gateway", GATEWAY_METRICS), ("decoder0", DECODER_METRICS),
                                         ("vision0", VISION_METRICS)])
def test_every_role_serves_its_metrics(observed_stack, traced, role, names):
    page = observed_stack.metrics(role)
    missing = [name for name in names if not has_metric(page, name)]
    assert not missing, f"{role} lacks {missing}"


def test_metrics_count_what_the_traced_request_did(observed_stack, traced):
    gateway = observed_stack.metrics("gateway")
    assert metric_value(gateway, "pixtral_gateway_time_to_first_token_seconds_count") >= 1
    assert metric_value(gateway, "pixtral_gateway_generated_tokens_total") >= 5
    assert metric_value(gateway, "pixtral_gateway_cache_lookups_total", result="miss") >= 1
    assert metric_value(gateway, "pixtral_gateway_encode_wait_seconds_count") >= 1
    assert metric_value(observed_stack.metrics("decoder0"), "pixtral_decoder_generated_tokens_total") >= 5
    assert metric_value(observed_stack.metrics("vision0"), "pixtral_vision_encoded_images_total") >= 1


def test_health_and_reflection(observed_stack):
    for address in (observed_stack.gateway, *observed_stack.decoders, *observed_stack.vision):
        assert health_status(address) == SERVING
        assert health_status(address, "liveness") == SERVING
    assert health_status(observed_stack.gateway, "pixtral.v1.Gateway") == SERVING
    assert health_status(observed_stack.decoders[0], "pixtral.v1.Decoder") == SERVING
    with grpc.insecure_channel(observed_stack.gateway) as channel:
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        services = {service.name for response in responses for service in response.list_services_response.service}
    assert {"pixtral.v1.Gateway", "grpc.health.v1.Health"} <= services


def test_readiness_follows_redis_and_liveness_does_not(observed_stack, observed_redis):
    """Last in this module: it takes the stack's Redis away and brings it back, empty."""
    addresses = [observed_stack.gateway, *observed_stack.decoders, *observed_stack.vision]

    def wait_for(status: int, service: str = "") -> None:
        give_up = time.monotonic() + 15
        while any(health_status(address, service) != status for address in addresses):
            assert time.monotonic() < give_up, [health_status(address, service) for address in addresses]
            time.sleep(0.1)

    observed_redis.process.terminate()
    observed_redis.process.wait(timeout=10)
    try:
        wait_for(NOT_SERVING)
        wait_for(SERVING, "liveness")
    finally:
        observed_redis.start()   # the same port, empty
    wait_for(SERVING)
    request = chat_request([("user", ["Back:", image_bytes(noise_image(32, 32, seed=501))])], max_tokens=3)
    with grpc.insecure_channel(observed_stack.gateway) as channel:
        last = list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=60))[-1]
    assert last.usage.encoded_images == 1


def listening_address(port: int) -> str | None:
    """The IPv4 address a socket listening on TCP `port` is bound to, as the kernel lists it (/proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, _, hex_port = fields[1].partition(":")
        if int(hex_port, 16) == port and fields[3] == "0A":   # 0A: LISTEN
            return socket.inet_ntoa(bytes.fromhex(address)[::-1])
    return None


def test_every_roles_metrics_endpoint_listens_on_the_roles_host_only(observed_stack):
    """The roles run with --host 127.0.0.1: their metrics are not served on every interface."""
    assert set(observed_stack.metrics_ports) >= {"gateway", "decoder0", "vision0"}
    for name, port in observed_stack.metrics_ports.items():
        assert listening_address(port) == "127.0.0.1", name
