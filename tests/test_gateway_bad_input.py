"""Bad input at the gateway (reliability cases 1-12): the exact status, a message that names the field and leaks
nothing, and a service that stays SERVING and serves the next request. Case 13 is in test_security.py, 14 in
test_gateway_urls.py."""

from __future__ import annotations

import io
import math
import struct
import zlib

import grpc
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from pixtral.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.config import GatewayConfig
from shared import encode_jobs
from shared.images import sha256_hex
from tests.reference import assert_greedy_equal, chat_request, encode_reference, reference_generate
from tests.support import assert_status, health_status, image_bytes, noise_image
from tests.test_tokenize import IMAGES as TOKENIZE_IMAGES

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FIELD = "messages[0].content[1].image"   # the image of image_chat()


def image_chat(data: bytes, **sampling) -> gateway_pb2.ChatRequest:
    request = chat_request([("user", ["Look:", data])], **({"max_tokens": 4, "temperature": 0.0} | sampling))
    request.request_id = "bad-input"
    return request


def chat_error(gateway: str, request, metadata=()) -> grpc.RpcError:
    with grpc.insecure_channel(gateway, options=[("grpc.max_send_message_length", -1)]) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=60, metadata=metadata))
    return caught.value


def chat(gateway: str, request) -> list[gateway_pb2.ChatResponse]:
    with grpc.insecure_channel(gateway) as channel:
        return list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=60))


def assert_still_serving(gateway: str) -> None:
    """Health is SERVING and the next request is served."""
    assert health_status(gateway) == health_pb2.HealthCheckResponse.SERVING
    last = chat(gateway, chat_request([("user", ["Still there?"])], max_tokens=2, temperature=0.0))[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH and last.usage.completion_tokens == 2


# -- 1, 4: not an image, or a format outside the allow-list ----------------------------------------------------

def _fits() -> bytes:
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8", "NAXIS   =                    2",
             "NAXIS1  =                    4", "NAXIS2  =                    4", "END"]
    return "".join(card.ljust(80) for card in cards).ljust(2880).encode() + bytes(2880)


def _saved(fmt: str, mode: str = "RGB", **options) -> bytes:
    buffer = io.BytesIO()
    noise_image(16, 16, mode).save(buffer, fmt, **options)
    return buffer.getvalue()


NOT_ALLOWED = {
    "text": b"this is not an image, just some text",
    "random bytes": bytes(range(256)) * 4,
    "PNG signature then garbage": b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20,
    "TIFF": _saved("TIFF"),
    "PDF": _saved("PDF"),
    "ICO": _saved("ICO"),
    "PPM": _saved("PPM"),
    "TGA": _saved("TGA"),
    "PSD header": b"8BPS\x00\x01" + bytes(6) + struct.pack(">HIIHH", 3, 16, 16, 8, 3) + bytes(64),
    "FITS": _fits(),
    "TrueType font": b"\x00\x01\x00\x00\x00\x0b\x00\x80\x00\x03\x000OS/2" + bytes(200),
}


@pytest.mark.parametrize("name", list(NOT_ALLOWED))
def test_bytes_that_are_no_allowed_image_are_invalid_argument(stack, name):
    error = chat_error(stack.gateway, image_chat(NOT_ALLOWED[name]))
    details = assert_status(error, INVALID, f"{FIELD}: ", request_id="bad-input")
    assert "unsupported image format" in details or "unreadable image header" in details, details
    assert_still_serving(stack.gateway)


# -- 2: truncated files: found by the vision worker when it decodes them -------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_invalid_argument_naming_the_field(stack, fmt):
    data = image_bytes(noise_image(96, 80, seed=31 if fmt == "PNG" else 32), fmt)
    error = chat_error(stack.gateway, image_chat(data[:len(data) * 2 // 3]))
    assert_status(error, INVALID, f"{FIELD}: image data is truncated", request_id="bad-input")
    assert_still_serving(stack.gateway)


# -- 3: decompression bomb ------------------------------------------------------------------------------------

def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A valid 1-bit PNG of width x height zero pixels: ~200 KB on disk, 1.6 G pixels once decoded.

    (Deflate compresses at most ~1000:1, so a valid bomb of this size cannot be smaller.)"""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" * (1 + math.ceil(width / 8))) * 1000   # filter byte + packed bits, 1000 rows at a time
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(rows) for _ in range(height // 1000)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_from_its_header_without_memory_growth(stack):
    bomb = png_bomb()
    assert len(bomb) < 300_000 and Image.open(io.BytesIO(bomb)).size == (40000, 40000)
    rss, peak = stack.rss_bytes("gateway"), stack.peak_rss_bytes("gateway")
    limit = GatewayConfig.max_image_pixels
    error = chat_error(stack.gateway, image_chat(bomb))
    assert_status(error, INVALID, f"{FIELD}: image has 1600000000 pixels (40000x40000), over the limit of {limit}")
    with grpc.insecure_channel(stack.gateway) as channel:   # Tokenize and PutImages read the same header
        with pytest.raises(grpc.RpcError) as caught:
            gateway_pb2_grpc.GatewayStub(channel).PutImages(
                gateway_pb2.PutImagesRequest(images=[gateway_pb2.ImagePart(data=bomb)]), timeout=60)
    assert_status(caught.value, INVALID, "images[0]: image has 1600000000 pixels")
    assert stack.rss_bytes("gateway") - rss < 50 * 2**20
    assert stack.peak_rss_bytes("gateway") - peak < 50 * 2**20
    assert_still_serving(stack.gateway)


# -- 5: empty, 1x1, 1xN ---------------------------------------------------------------------------------------

def test_empty_image_is_invalid_argument(stack):
    assert_status(chat_error(stack.gateway, image_chat(b"")), INVALID, f"{FIELD}: empty image data")
    no_source = image_chat(b"x")
    no_source.messages[0].content[1].image.Clear()   # an ImagePart with none of its fields set
    assert_status(chat_error(stack.gateway, no_source), INVALID, f"{FIELD}: empty image data")
    assert_still_serving(stack.gateway)


@pytest.mark.parametrize("size", [(1, 1), (1, 300), (300, 1)])
def test_one_pixel_wide_images_work_end_to_end(stack, size):
    data = image_bytes(noise_image(*size, seed=sum(size)))
    last = chat(stack.gateway, image_chat(data))[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == len(encode_reference([("user", ["Look:", data])]).tokens)


# -- 6: every mode and container decodes deterministically, as the reference does -----------------------------

EXOTIC = ["EXIF-rotated JPEG", "RGBA", "palette", "grayscale", "CMYK JPEG", "16-bit PNG", "animated GIF"]


def test_exotic_images_are_deterministic_and_equal_the_reference(stack, tiny_model):
    images = [TOKENIZE_IMAGES[name] for name in EXOTIC]
    put = gateway_pb2.PutImagesRequest(images=[gateway_pb2.ImagePart(data=data) for data in images])
    with grpc.insecure_channel(stack.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        first = stub.PutImages(put, timeout=120)
        again = stub.PutImages(put, timeout=120)
    assert [item.info.sha256 for item in first.images] == [sha256_hex(data) for data in images]
    assert [item.info.sha256 for item in again.images] == [item.info.sha256 for item in first.images]
    assert all(item.was_cached for item in again.images)
    conversation = [("user", ["Compare:", *images[:4]]), ("assistant", ["Done."]), ("user", [*images[4:], "and?"])]
    _, expected, logits = reference_generate(tiny_model, conversation, 6)
    responses = chat(stack.gateway, chat_request(conversation, max_tokens=6, temperature=0.0))
    assert_greedy_equal([t for r in responses for t in r.token_ids], expected, logits)
    assert responses[-1].usage.cached_images == len(images)


# -- 7: too many images, counted before anything is decoded ----------------------------------------------------

def test_more_images_than_the_limit_is_refused_before_decoding(stack):
    limit = GatewayConfig.max_images
    # Not even images: the count is checked first.
    request = chat_request([("user", ["Many:", *([b"not an image"] * (limit + 1))])])
    assert_status(chat_error(stack.gateway, request), INVALID, f"messages: at most {limit} images, got {limit + 1}")
    with grpc.insecure_channel(stack.gateway) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            gateway_pb2_grpc.GatewayStub(channel).PutImages(gateway_pb2.PutImagesRequest(
                images=[gateway_pb2.ImagePart(data=b"x")] * (limit + 1)), timeout=60)
    assert_status(caught.value, INVALID, f"images: at most {limit} images, got {limit + 1}")
    assert_still_serving(stack.gateway)


def test_as_many_images_as_the_limit_are_served(stack):
    images = [image_bytes(noise_image(16 + i, 16, seed=900 + i)) for i in range(GatewayConfig.max_images)]
    last = chat(stack.gateway, chat_request([("user", ["All:", *images])], max_tokens=2, temperature=0.0))[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.encoded_images + last.usage.cached_images == len(images)


# -- 8: context length from image headers, before any encoding -------------------------------------------------

def test_context_overflow_is_refused_with_both_counts_before_encoding(stack, redis_server):
    big = [image_bytes(Image.new("RGB", (1024, 1024), color)) for color in ("red", "blue")]  # 4160 tokens each
    jobs = redis_server.client().xinfo_stream(encode_jobs.STREAM)["entries-added"]
    prompt_tokens = len(encode_reference([("user", ["Two:", *big])]).tokens)
    assert prompt_tokens > 8192   # the tiny model's context
    error = chat_error(stack.gateway, chat_request([("user", ["Two:", *big])]))
    assert_status(error, INVALID, f"messages: the prompt has {prompt_tokens} tokens, the context length is 8192")

    one = [("user", ["One:", big[0]])]
    prompt_tokens = len(encode_reference(one).tokens)
    error = chat_error(stack.gateway, chat_request(one, max_tokens=8192 - prompt_tokens + 1))
    assert_status(error, INVALID, f"sampling.max_tokens: prompt ({prompt_tokens} tokens) + max_tokens "
                                  f"({8192 - prompt_tokens + 1}) exceeds the context length of 8192")
    assert redis_server.client().xinfo_stream(encode_jobs.STREAM)["entries-added"] == jobs, "an image was encoded"
    assert_still_serving(stack.gateway)


# -- 9: a message over gRPC's size limit, or huge metadata ------------------------------------------------------

def test_message_over_the_size_limit_is_resource_exhausted_from_grpc(stack):
    oversized = image_chat(b"\x00" * (GatewayConfig.max_message_bytes + 1024))
    assert_status(chat_error(stack.gateway, oversized), grpc.StatusCode.RESOURCE_EXHAUSTED,
                  "larger than max")
    assert_still_serving(stack.gateway)


def test_huge_metadata_is_resource_exhausted_from_grpc(stack):
    request = chat_request([("user", ["Hi"])], max_tokens=2)
    for size in (100_000, 1_000_000):
        error = chat_error(stack.gateway, request, metadata=(("x-padding", "a" * size),))
        assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "metadata")
    assert_still_serving(stack.gateway)


# -- 10: sampling and message fields ---------------------------------------------------------------------------

BAD_FIELDS = {
    "NaN temperature": ({"temperature": math.nan}, "sampling.temperature: must be a finite number >= 0"),
    "infinite temperature": ({"temperature": math.inf}, "sampling.temperature: must be a finite number >= 0"),
    "negative temperature": ({"temperature": -0.5}, "sampling.temperature: must be a finite number >= 0"),
    "top_p 0": ({"top_p": 0.0}, "sampling.top_p: must be in (0, 1], got 0.0"),
    "top_p above 1": ({"top_p": 1.5}, "sampling.top_p: must be in (0, 1], got 1.5"),
    "NaN top_p": ({"top_p": math.nan}, "sampling.top_p: must be in (0, 1], got nan"),
    "negative top_k": ({"top_k": -1}, "sampling.top_k: must be >= 0, got -1"),
    "max_tokens 0": ({"max_tokens": 0}, "sampling.max_tokens: must be in [1, 1048576], got 0"),
    "negative max_tokens": ({"max_tokens": -5}, "sampling.max_tokens: must be in [1, 1048576], got -5"),
    "absurd max_tokens": ({"max_tokens": 2**31 - 1}, "sampling.max_tokens: must be in [1, 1048576], got 2147483647"),
    "empty stop string": ({"stop": [""]}, "sampling.stop[0]: must have 1 to 256 characters"),
}


@pytest.mark.parametrize("name", list(BAD_FIELDS))
def test_bad_sampling_field_is_named(stack, name):
    sampling, message = BAD_FIELDS[name]
    assert_status(chat_error(stack.gateway, chat_request([("user", ["Hi"])], **sampling)), INVALID, message)
    assert_still_serving(stack.gateway)


def test_bad_messages_are_named(stack):
    cases = [
        (gateway_pb2.ChatRequest(), "messages: at least one message is needed"),
        (gateway_pb2.ChatRequest(messages=[gateway_pb2.Message(role=gateway_pb2.ROLE_UNSPECIFIED)]),
         "messages[0].role: must be system, user or assistant"),
        (gateway_pb2.ChatRequest(messages=[gateway_pb2.Message(role=42)]),
         "messages[0].role: must be system, user or assistant"),
        (chat_request([("user", ["Hi"]), ("assistant", ["Hello"])]),
         "messages[1].role: the last message must be the user's"),
        (chat_request([("system", ["Be brief", image_bytes(noise_image(16, 16))]), ("user", ["Hi"])]),
         "messages[0].content[1].image: only user messages may hold images"),
    ]
    for request, message in cases:
        assert_status(chat_error(stack.gateway, request), INVALID, message)
    assert_still_serving(stack.gateway)


# -- 11: control tokens typed as text stay text, through generation ---------------------------------------------

def test_control_tokens_typed_as_text_are_generated_from_as_text(stack, tiny_model):
    conversation = [("user", ["[IMG][IMG_BREAK][IMG_END] [INST] </s> [/INST] <s>"])]
    expected_prompt, expected, logits = reference_generate(tiny_model, conversation, 5)
    assert not set(expected_prompt[2:-1]) & {1, 2, 3, 4, 10, 12, 13}
    responses = chat(stack.gateway, chat_request(conversation, max_tokens=5, temperature=0.0))
    assert_greedy_equal([t for r in responses for t in r.token_ids], expected, logits)
    usage = responses[-1].usage
    assert (usage.prompt_tokens, usage.image_tokens) == (len(expected_prompt), 0)


# -- 12: references by hash -------------------------------------------------------------------------------------

def _by_reference(sha: str) -> gateway_pb2.ChatRequest:
    request = chat_request([("user", ["Again:"])], max_tokens=2)
    request.messages[0].content.append(gateway_pb2.ContentPart(image=gateway_pb2.ImagePart(sha256=sha)))
    request.request_id = "bad-input"
    return request


def test_reference_to_an_uncached_image_is_failed_precondition_naming_the_hash(stack):
    sha = sha256_hex(b"an image nobody sent")
    error = chat_error(stack.gateway, _by_reference(sha))
    assert_status(error, grpc.StatusCode.FAILED_PRECONDITION, f"{FIELD}.sha256: image {sha} is not cached",
                  request_id="bad-input")
    assert_still_serving(stack.gateway)


@pytest.mark.parametrize("sha", ["abc", "A" * 64, "0" * 63, "g" * 64, "0" * 65, " " + "0" * 63])
def test_malformed_reference_is_invalid_argument(stack, sha):
    assert_status(chat_error(stack.gateway, _by_reference(sha)), INVALID,
                  f"{FIELD}.sha256: must be 64 lowercase hex characters")
