"""The public API's shapes: system prompt, multi-turn, images as bytes, data: URLs and references; PutImages."""

from __future__ import annotations

import base64

import grpc
import pytest

from pixtral.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from shared import encode_jobs
from shared.images import sha256_hex
from tests.reference import chat_request, encode_reference
from tests.support import assert_status, image_bytes, noise_image

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def part(data: bytes | None = None, url: str | None = None, sha256: str | None = None) -> gateway_pb2.ContentPart:
    image = gateway_pb2.ImagePart(data=data) if data is not None else (
        gateway_pb2.ImagePart(url=url) if url is not None else gateway_pb2.ImagePart(sha256=sha256))
    return gateway_pb2.ContentPart(image=image)


def put_images(gateway: str, *parts: gateway_pb2.ImagePart, request_id: str = "") -> gateway_pb2.PutImagesResponse:
    with grpc.insecure_channel(gateway) as channel:
        return gateway_pb2_grpc.GatewayStub(channel).PutImages(
            gateway_pb2.PutImagesRequest(images=parts, request_id=request_id), timeout=120)


def put_images_error(gateway: str, *parts: gateway_pb2.ImagePart) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        put_images(gateway, *parts)
    return caught.value


def test_every_image_source_in_a_multi_turn_chat_with_a_system_prompt(stack):
    first, second, third = (image_bytes(noise_image(48, 32 + 16 * i, seed=300 + i)) for i in range(3))
    put_images(stack.gateway, gateway_pb2.ImagePart(data=third))   # sent before: named by hash below
    conversation = [("system", ["Answer in one word."]), ("user", ["What is", first, "?"]),
                    ("assistant", ["A picture."]), ("user", [second, "and", third, "?"])]
    request = chat_request(conversation, max_tokens=4, temperature=0.0)
    turn = request.messages[3].content
    turn[0].CopyFrom(part(url=data_url(second)))
    turn[2].CopyFrom(part(sha256=sha256_hex(third)))
    expected = encode_reference(conversation).tokens
    with grpc.insecure_channel(stack.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        tokenized = stub.Tokenize(request, timeout=60)
        responses = list(stub.Chat(request, timeout=120))
    assert list(tokenized.token_ids) == expected
    assert [info.sha256 for info in tokenized.images] == [sha256_hex(data) for data in (first, second, third)]
    usage = responses[-1].usage
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (usage.prompt_tokens, usage.encoded_images, usage.cached_images) == (len(expected), 2, 1)


def test_a_data_url_is_the_same_image_as_its_bytes(stack):
    data = image_bytes(noise_image(40, 24, seed=310), "JPEG")
    by_bytes = chat_request([("user", ["What?", data])])
    by_url = chat_request([("user", ["What?", data])])
    by_url.messages[0].content[1].CopyFrom(part(url=data_url(data, "image/jpeg")))
    with grpc.insecure_channel(stack.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        assert stub.Tokenize(by_url, timeout=60) == stub.Tokenize(by_bytes, timeout=60)


def test_put_images_then_chat_by_hash_uploads_and_encodes_nothing(stack, redis_server):
    pictures = [image_bytes(noise_image(64, 48, seed=320)), image_bytes(noise_image(1500, 90, seed=321), "JPEG")]
    first = put_images(stack.gateway, gateway_pb2.ImagePart(data=pictures[0]),
                       gateway_pb2.ImagePart(url=data_url(pictures[1], "image/jpeg")), request_id="warm-1")
    assert first.request_id == "warm-1"
    assert [item.was_cached for item in first.images] == [False, False]
    hashes = [item.info.sha256 for item in first.images]
    assert hashes == [sha256_hex(data) for data in pictures]

    # Sizes and grids are what Tokenize reports for the same images.
    with grpc.insecure_channel(stack.gateway) as channel:
        tokenized = gateway_pb2_grpc.GatewayStub(channel).Tokenize(
            chat_request([("user", [*pictures, "x"])]), timeout=60)
    assert [item.info for item in first.images] == list(tokenized.images)
    assert (first.images[1].info.width, first.images[1].info.height) == (1500, 90)
    assert (first.images[1].info.grid_width, first.images[1].info.grid_height) == (64, 4)
    assert first.images[1].info.num_tokens == 4 * 65

    again = put_images(stack.gateway, gateway_pb2.ImagePart(sha256=hashes[1]), gateway_pb2.ImagePart(data=pictures[0]))
    assert [item.was_cached for item in again.images] == [True, True]
    assert again.request_id   # one is assigned when the caller sets none
    # By reference, the size is the resized image's (that is all the cache knows).
    assert (again.images[0].info.width, again.images[0].info.height) == (1024, 64)
    assert again.images[0].info.num_tokens == first.images[1].info.num_tokens

    jobs = redis_server.client().xinfo_stream(encode_jobs.STREAM)["entries-added"]
    request = chat_request([("user", ["Compare"])], max_tokens=3, temperature=0.0)
    request.messages[0].content.extend([part(sha256=sha) for sha in hashes])
    with grpc.insecure_channel(stack.gateway) as channel:
        last = list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=120))[-1]
    assert (last.usage.cached_images, last.usage.encoded_images) == (2, 0)
    assert last.usage.prompt_tokens == len(encode_reference([("user", ["Compare", *pictures])]).tokens)
    assert redis_server.client().xinfo_stream(encode_jobs.STREAM)["entries-added"] == jobs, "an encode job ran"


def test_put_images_validates_like_chat(stack):
    good = gateway_pb2.ImagePart(data=image_bytes(noise_image(16, 16, seed=330)))
    assert_status(put_images_error(stack.gateway), INVALID, "images: at least one image is needed")
    assert_status(put_images_error(stack.gateway, good, gateway_pb2.ImagePart(data=b"GIF89a nope")), INVALID,
                  "images[1]: unsupported image format")
    assert_status(put_images_error(stack.gateway, gateway_pb2.ImagePart()), INVALID, "images[0]: empty image data")
    assert_status(put_images_error(stack.gateway, gateway_pb2.ImagePart(url="file:///etc/passwd")), INVALID,
                  "images[0].url: only data:image/...;base64 URLs", "not file:")
    assert_status(put_images_error(stack.gateway, gateway_pb2.ImagePart(sha256="F" * 64)), INVALID,
                  "images[0].sha256: must be 64 lowercase hex characters")
    missing = sha256_hex(b"never sent")
    assert_status(put_images_error(stack.gateway, good, gateway_pb2.ImagePart(sha256=missing)),
                  grpc.StatusCode.FAILED_PRECONDITION, f"images[1].sha256: image {missing} is not cached")
    truncated = image_bytes(noise_image(80, 80, seed=331))
    assert_status(put_images_error(stack.gateway, gateway_pb2.ImagePart(data=truncated[:len(truncated) // 2])),
                  INVALID, "images[0]: image data is truncated")
