"""What every role shares: limits decided once (the decoder's Info, the gateway's GetModelInfo), errors that carry
their data as rich details, and retries through tenacity for idempotent Redis calls only."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pixtral.v1 import decoder_pb2, decoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from services.gateway.images import ImageFile
from services.gateway.vision_pool import VisionPool
from shared import encode_jobs
from shared.cache_probe import probe_entries
from shared.embedding_cache import cache_key, encode_entry
from shared.errors import Unavailable
from shared.redis_client import connect
from tests.reference import chat_request, encode_reference
from tests.support import Stack, TcpProxy, assert_status, wait_until

# 32 KV blocks of 16 tokens on the tiny model (2 layers, 2 KV heads of 16 values, float32): a 512-token context.
SMALL_KV_GIB = str(32 * 2 * 2 * 16 * 2 * 16 * 4 / (1 << 30))


@pytest.fixture(scope="module")
def small_kv_stack(tiny_model, redis_server, tmp_path_factory):
    running = Stack(tiny_model, redis_server.url, tmp_path_factory.mktemp("small-kv"),
                    decoder_args=("--kv-cache-gib", SMALL_KV_GIB)).start()
    yield running
    running.stop()


def model_info(gateway: str) -> gateway_pb2.ModelInfo:
    with grpc.insecure_channel(gateway) as channel:
        return gateway_pb2_grpc.GatewayStub(channel).GetModelInfo(gateway_pb2.GetModelInfoRequest(), timeout=10)


def test_the_decoder_reports_its_limits(small_kv_stack):
    with grpc.insecure_channel(small_kv_stack.decoders[0]) as channel:
        info = decoder_pb2_grpc.DecoderStub(channel).Info(decoder_pb2.InfoRequest(), timeout=10)
    assert (info.max_model_len, info.vocab_size, info.block_size, info.num_blocks) == (512, 131072, 16, 32)
    assert info.prefix_caching and len(info.model_fingerprint) == 16
    # --max-num-seqs by default: what 512 KV tokens hold of 2,560-token sequences, at least 16
    assert (info.max_num_seqs, info.max_queued, info.num_unfinished) == (16, 256, 0)


def test_get_model_info_answers_with_the_decoders_context(stack, small_kv_stack):
    info = model_info(stack.gateway)
    assert (info.model, info.context_length, info.default_max_tokens) == ("model", 8192, 256)
    assert (info.max_images, info.max_image_bytes, info.max_image_pixels) == (16, 20 << 20, 50_000_000)
    assert (info.max_image_side, info.patch_size, info.num_decoders, info.prefix_caching) == (1024, 16, 1, True)
    assert len(info.model_fingerprint) == 16
    # A decoder whose KV cache holds less than the model's context: the gateway's context is the decoder's.
    assert wait_until(lambda: model_info(small_kv_stack.gateway).context_length == 512, 30, "the decoder's context")


def test_a_decoder_with_a_small_kv_cache_makes_the_gateway_refuse_an_over_long_prompt(small_kv_stack):
    wait_until(lambda: model_info(small_kv_stack.gateway).context_length == 512, 30, "the decoder's context")
    turn = [("user", ["Tell me about Pixtral."])]
    prompt_tokens = len(encode_reference(turn).tokens)
    with grpc.insecure_channel(small_kv_stack.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Chat(chat_request(turn, max_tokens=512 - prompt_tokens + 1), timeout=30))
        details = assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens",
                                "exceeds the context length of 512")
        assert f"prompt ({prompt_tokens} tokens)" in details
        # Without max_tokens the default is capped by the same context: the request is served.
        last = list(stub.Chat(chat_request(turn, max_tokens=512 - prompt_tokens, temperature=0.0), timeout=60))[-1]
        assert last.usage.prompt_tokens + last.usage.completion_tokens <= 512


def test_errors_carry_their_field_and_the_missing_image_as_rich_details(stack):
    with grpc.insecure_channel(stack.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Chat(chat_request([("user", ["Hi"])], top_p=1.5), timeout=10))
        status = rpc_status.from_call(caught.value)
        bad_request = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad_request)
        assert [(v.field, v.description) for v in bad_request.field_violations] == [
            ("sampling.top_p", "must be in (0, 1], got 1.5")]
        missing = "7" * 64
        request = chat_request([("user", ["Hi"])])
        request.messages[0].content.add().image.sha256 = missing
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Chat(request, timeout=10))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_details_pb2.ErrorInfo()
        assert rpc_status.from_call(caught.value).details[0].Unpack(info)
        assert (info.reason, info.metadata["sha256"]) == ("IMAGE_NOT_CACHED", missing)


# -- retries: tenacity, idempotent calls only --------------------------------------------------------------------

def test_a_redis_blip_during_an_idempotent_read_is_retried(module_redis):
    fingerprint, sha = "f" * 16, "ab" * 32
    module_redis.client().set(cache_key(fingerprint, sha), encode_entry(torch.zeros(6, 8), (2, 3), fingerprint, sha))
    proxy = TcpProxy(module_redis.port)

    async def probe():
        client = connect(proxy.url, timeout_s=5.0)
        try:
            await client.ping()
            proxy.drop_next()   # the probe's pipeline never reaches Redis: its connection closes
            return await probe_entries(client, fingerprint, [sha])
        finally:
            await client.aclose()
    try:
        headers = asyncio.run(probe())
    finally:
        proxy.close()
    assert (headers[sha].grid_height, headers[sha].grid_width) == (2, 3)


def test_a_redis_blip_during_a_lock_and_enqueue_is_not_retried(module_redis):
    fingerprint, image = "e" * 16, ImageFile("cd" * 32, b"png", "images[0]")
    proxy = TcpProxy(module_redis.port)

    async def encode():
        client = connect(proxy.url, timeout_s=5.0)
        try:
            await client.ping()
            proxy.drop_next()   # the lock's SET NX never reaches Redis: sent again, it could take a lock twice
            await VisionPool(client, fingerprint, lock_ttl_s=5.0).encode([image], "r", timeout_s=10.0)
        finally:
            await client.aclose()
    try:
        with pytest.raises(Unavailable, match="embedding cache unreachable"):
            asyncio.run(encode())
    finally:
        proxy.close()
    plain = module_redis.client()
    assert not plain.exists(encode_jobs.lock_key(fingerprint, image.sha256))
    assert not plain.exists(encode_jobs.STREAM)   # no job enqueued either
