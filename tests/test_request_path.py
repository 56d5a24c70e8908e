"""The whole request path through separate processes (real Redis, real gRPC): equal to transformers' Llava."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest

from pixtral.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from shared import encode_jobs
from shared.fingerprints import vision_fingerprint
from shared.embedding_cache import cache_key
from shared.images import sha256_hex
from tests.reference import assert_greedy_equal, chat_request, reference_generate
from tests.support import EMBEDDING_TTL_S, RedisServer, Stack, image_bytes, noise_image

MAX_TOKENS = 12


def run_chat(gateway: str, request: gateway_pb2.ChatRequest) -> tuple[list[int], str, gateway_pb2.ChatResponse]:
    with grpc.insecure_channel(gateway) as channel:
        responses = list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=120))
    token_ids = [token for response in responses for token in response.token_ids]
    text = "".join(response.text for response in responses)
    return token_ids, text, responses[-1]


IMAGE_A = image_bytes(noise_image(300, 200, seed=1))
IMAGE_B = image_bytes(noise_image(40, 64, seed=2), "JPEG", quality=90)
IMAGE_C = image_bytes(noise_image(1500, 90, "RGBA", seed=3))

CHATS = {
    "text only": [("user", ["Hello, who are you?"])],
    "one image": [("user", ["Describe this picture.", IMAGE_A])],
    "three images, multi-turn with a system prompt": [
        ("system", ["You are terse."]),
        ("user", ["First:", IMAGE_B, "then"]),
        ("assistant", ["Noted."]),
        ("user", [IMAGE_C, "compare with", IMAGE_A, "and", IMAGE_B]),
    ],
}


@pytest.mark.parametrize("name", list(CHATS))
def test_greedy_completion_equals_llava_generate(stack, tiny_model, name):
    chat = CHATS[name]
    _, expected, logits = reference_generate(tiny_model, chat, MAX_TOKENS)
    token_ids, _, last = run_chat(stack.gateway, chat_request(chat, max_tokens=MAX_TOKENS, temperature=0.0))
    assert_greedy_equal(token_ids, expected, logits)
    assert last.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
    assert last.usage.completion_tokens == len(token_ids)


def test_second_request_and_sha256_reference_are_served_from_cache(stack, redis_server, tiny_model):
    picture = image_bytes(noise_image(96, 48, seed=11))
    chat = [("user", ["What is it?", picture])]
    request = chat_request(chat, max_tokens=6, temperature=0.0)
    first_ids, _, first = run_chat(stack.gateway, request)
    assert (first.usage.encoded_images, first.usage.cached_images) == (1, 0)

    client = redis_server.client()
    key = cache_key(vision_fingerprint(tiny_model), sha256_hex(picture))
    assert 0 < client.ttl(key) <= EMBEDDING_TTL_S   # written with the vision worker's expiry
    jobs_before = client.xinfo_stream(encode_jobs.STREAM)["entries-added"]
    client.expire(key, 100)
    second_ids, _, second = run_chat(stack.gateway, request)
    assert (second.usage.encoded_images, second.usage.cached_images) == (0, 1)
    assert client.ttl(key) > 100, "using the embedding did not renew its expiry"

    by_ref = gateway_pb2.ChatRequest()
    by_ref.CopyFrom(request)
    by_ref.messages[0].content[1].image.Clear()
    by_ref.messages[0].content[1].image.sha256 = sha256_hex(picture)
    client.expire(key, 100)
    ref_ids, _, third = run_chat(stack.gateway, by_ref)
    assert (third.usage.encoded_images, third.usage.cached_images) == (0, 1)
    assert client.ttl(key) > 100, "using the embedding by its sha256 did not renew its expiry"
    assert client.xinfo_stream(encode_jobs.STREAM)["entries-added"] == jobs_before, "an encode job ran"
    assert first_ids == second_ids == ref_ids
    assert first.usage.prompt_tokens == second.usage.prompt_tokens == third.usage.prompt_tokens
    assert first.usage.image_tokens == (48 // 16) * (96 // 16 + 1)


def test_two_vision_workers_share_jobs_and_concurrent_requests_stay_exact(tiny_model, tmp_path_factory):
    redis_server = RedisServer().start()  # its own: the shared stack's worker must not take these jobs
    stack = Stack(tiny_model, redis_server.url, tmp_path_factory.mktemp("two-workers"), num_vision=2,
                  vision_args=("--max-batch-images", "1")).start()
    try:
        chats = [[("user", [f"Picture {i}:", image_bytes(noise_image(32 + 16 * i, 48, seed=100 + i))])]
                 for i in range(6)]
        chats.append([("user", ["No picture, just text."])])
        with concurrent.futures.ThreadPoolExecutor(len(chats)) as pool:
            results = list(pool.map(
                lambda chat: run_chat(stack.gateway, chat_request(chat, max_tokens=MAX_TOKENS, temperature=0.0)),
                chats))
        for chat, (token_ids, _, last) in zip(chats, results):
            _, expected, logits = reference_generate(tiny_model, chat, MAX_TOKENS)
            assert_greedy_equal(token_ids, expected, logits)
        encoded_by = [stack.logs(f"vision{i}").count('"encoded image ') for i in range(2)]
        assert sum(encoded_by) == 6 and min(encoded_by) >= 1, f"jobs per worker: {encoded_by}"
    finally:
        stack.stop()
        redis_server.stop()


def test_a_second_question_on_the_same_image_reuses_its_prefill_and_stays_exact(observed_stack, tiny_model):
    """The decoder's prefix cache: the image's [IMG] tokens come first, so their KV is shared, not computed again."""
    from tests.support import metric_value
    picture = image_bytes(noise_image(256, 128, seed=21))
    chats = [[("user", [picture, question])] for question in ("Describe this picture.", "What colour dominates?")]

    def hit_tokens() -> float:
        return metric_value(observed_stack.metrics("decoder0"), "pixtral_decoder_prefix_cache_hit_tokens_total")

    before = hit_tokens()
    for chat in chats:
        _, expected, logits = reference_generate(tiny_model, chat, MAX_TOKENS)
        token_ids, _, last = run_chat(observed_stack.gateway, chat_request(chat, max_tokens=MAX_TOKENS,
                                                                           temperature=0.0))
        assert_greedy_equal(token_ids, expected, logits)
    image_tokens = last.usage.image_tokens
    assert image_tokens == (128 // 16) * (256 // 16 + 1)
    # Everything up to the block holding the end of the image, in blocks of 16 tokens.
    assert hit_tokens() - before >= (image_tokens // 16) * 16
