"""A decoder that encodes images itself (`--vision-in-process`): no vision worker process, the same answers, a
worker of the pool like the others (its consumer in the group, its images in the shared cache), and it leaves
the group when the decoder drains."""

from __future__ import annotations

import signal

import pytest

from services.gpu_placement import place
from services.serve_config import ServeConfig
from shared import encode_jobs
from shared.embedding_cache import cache_key
from shared.fingerprints import vision_fingerprint
from shared.images import sha256_hex
from tests.reference import assert_greedy_equal, chat_request, reference_generate
from tests.support import RedisServer, Stack, image_bytes, metric_value, noise_image
from tests.test_request_path import MAX_TOKENS, run_chat


@pytest.fixture(scope="module")
def encoding_decoder(tiny_model, module_redis, tmp_path_factory):
    """One decoder that encodes, no vision worker process, on a Redis of its own (no other stack's worker takes
    its jobs)."""
    running = Stack(tiny_model, module_redis.url, tmp_path_factory.mktemp("colocated"), num_vision=0,
                    decoder_args=("--vision-in-process", "true"), with_metrics=True).start()
    yield running
    running.stop()


def test_a_decoder_that_encodes_answers_image_chats_as_transformers_does(encoding_decoder, tiny_model,
                                                                         module_redis):
    pictures = [image_bytes(noise_image(96, 48, seed=31)), image_bytes(noise_image(40, 64, seed=32), "JPEG")]
    chat = [("user", ["Compare", pictures[0], "with", pictures[1]])]
    _, expected, logits = reference_generate(tiny_model, chat, MAX_TOKENS)
    token_ids, _, last = run_chat(encoding_decoder.gateway, chat_request(chat, max_tokens=MAX_TOKENS,
                                                                         temperature=0.0))
    assert_greedy_equal(token_ids, expected, logits)
    assert (last.usage.encoded_images, last.usage.cached_images) == (2, 0)
    # Written to the shared cache, as a vision worker writes it: the next request (any decoder's) finds it.
    client = module_redis.client()
    fingerprint = vision_fingerprint(tiny_model)
    assert all(client.exists(cache_key(fingerprint, sha256_hex(picture))) for picture in pictures)
    again_ids, _, again = run_chat(encoding_decoder.gateway, chat_request(chat, max_tokens=MAX_TOKENS,
                                                                          temperature=0.0))
    assert (again.usage.encoded_images, again.usage.cached_images) == (0, 2)
    assert again_ids == token_ids
    page = encoding_decoder.metrics("decoder0")
    assert metric_value(page, "pixtral_vision_encoded_images_total") == 2
    assert metric_value(page, "pixtral_decoder_generated_tokens_total") >= 2 * MAX_TOKENS   # its own beside them


def test_the_decoders_worker_is_a_consumer_of_the_group_and_leaves_it_on_drain(tiny_model, tmp_path_factory):
    redis_server = RedisServer().start()   # its own: the module's decoder must not take this job
    running = Stack(tiny_model, redis_server.url, tmp_path_factory.mktemp("colocated-drain"), num_vision=0,
                    decoder_args=("--vision-in-process", "true")).start()
    client = redis_server.client()
    pid = running.processes["decoder0"].pid

    def is_a_consumer() -> bool:
        consumers = client.xinfo_consumers(encode_jobs.STREAM, encode_jobs.GROUP)
        return any(c["name"].decode().endswith(f"-{pid}") for c in consumers)

    try:
        picture = image_bytes(noise_image(64, 32, seed=33))
        _, _, last = run_chat(running.gateway, chat_request([("user", [picture])], max_tokens=2))
        assert last.usage.encoded_images == 1
        assert is_a_consumer()   # a read that got a job made it one
        running.stop_process("decoder0", signal.SIGTERM)
        assert running.processes["decoder0"].returncode == 0
        assert not is_a_consumer()
    finally:
        running.stop()
        redis_server.stop()


def test_pixtral_serve_places_no_vision_process_where_the_decoders_encode():
    assert place(["0", "1"], 2, 3, "decoder").vision == ()
    on_gpu = ServeConfig(device="cuda", vision_gpus="decoder", vision_workers=2)
    assert (on_gpu.decoders_encode, on_gpu.num_vision_processes) == (True, 0)
    on_cpu = ServeConfig(device="cpu", vision_gpus="decoder", vision_workers=2)   # placement is for GPUs only
    assert (on_cpu.decoders_encode, on_cpu.num_vision_processes) == (False, 2)
