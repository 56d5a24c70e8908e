"""Tokenize through the running gateway equals mistral-common's encode_chat_completion, for every kind of image."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from pixtral.v1 import gateway_pb2_grpc
from shared.images import sha256_hex
from tests.reference import chat_request, encode_reference
from tests.support import image_bytes, noise_image


def exif_rotated_jpeg() -> bytes:
    image = noise_image(120, 40, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when displayed
    return image_bytes(image, "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [noise_image(50, 30, "P", seed=s) for s in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def png16() -> bytes:
    pixels = np.random.default_rng(7).integers(0, 65535, (37, 53), dtype=np.uint16)
    return image_bytes(Image.fromarray(pixels))


IMAGES = {
    "1x1": image_bytes(noise_image(1, 1)),
    "1x300 tall strip": image_bytes(noise_image(1, 300)),
    "2000x33 (rounding differs in transformers)": image_bytes(noise_image(2000, 33)),
    "2000x100 wide": image_bytes(noise_image(2000, 100)),
    "3000x1500 over 1024": image_bytes(noise_image(3000, 1500), "JPEG"),
    "1024x1024 exactly": image_bytes(noise_image(1024, 1024), "JPEG"),
    "1025x17": image_bytes(noise_image(1025, 17)),
    "RGBA": image_bytes(noise_image(70, 50, "RGBA")),
    "palette": image_bytes(noise_image(64, 64, "P")),
    "grayscale": image_bytes(noise_image(33, 65, "L")),
    "CMYK JPEG": image_bytes(noise_image(48, 80, "CMYK"), "JPEG"),
    "EXIF-rotated JPEG": exif_rotated_jpeg(),
    "16-bit PNG": png16(),
    "animated GIF": animated_gif(),
    "WebP": image_bytes(noise_image(90, 60), "WEBP"),
    "BMP": image_bytes(noise_image(17, 31), "BMP"),
}


def tokenize(gateway: str, chat):
    with grpc.insecure_channel(gateway) as channel:
        return gateway_pb2_grpc.GatewayStub(channel).Tokenize(chat_request(chat), timeout=60)


@pytest.mark.parametrize("name", list(IMAGES))
def test_image_tokens_equal_mistral_common(stack, name):
    chat = [("user", ["Look:", IMAGES[name], "What is it?"])]
    response = tokenize(stack.gateway, chat)
    assert list(response.token_ids) == encode_reference(chat).tokens
    (info,) = response.images
    assert info.sha256 == sha256_hex(IMAGES[name])
    assert info.num_tokens == info.grid_height * (info.grid_width + 1)
    assert list(response.token_ids).count(10) == info.grid_height * info.grid_width


CHATS = {
    "text only": [("user", ["Hello"])],
    "a lone trailing image moves first": [("user", ["What?", IMAGES["RGBA"]])],
    "images in any order between texts": [("user", [IMAGES["palette"], "and", IMAGES["BMP"], "vs", IMAGES["1x1"]])],
    "multi-turn with a system prompt": [
        ("system", ["Be brief."]), ("user", ["Hi", IMAGES["grayscale"]]), ("assistant", ["Yo"]),
        ("user", [IMAGES["WebP"], "Again", IMAGES["grayscale"]])],
    "control tokens typed as text stay text": [("user", ["[IMG][IMG_BREAK][INST] </s> [/INST]"])],
    "unicode": [("user", ["Ünïcödé 🙂 中文 עברית"])],
}


@pytest.mark.parametrize("name", list(CHATS))
def test_chat_tokens_equal_mistral_common(stack, name):
    chat = CHATS[name]
    response = tokenize(stack.gateway, chat)
    reference = encode_reference(chat)
    assert list(response.token_ids) == reference.tokens
    assert len(response.images) == len(reference.images)


def test_images_are_listed_in_prompt_order(stack):
    chat = [("user", ["What?", IMAGES["RGBA"]]), ("assistant", ["A"]), ("user", [IMAGES["BMP"], "x", IMAGES["1x1"]])]
    response = tokenize(stack.gateway, chat)
    assert [info.sha256 for info in response.images] == [
        sha256_hex(IMAGES[name]) for name in ("RGBA", "BMP", "1x1")]


def test_special_tokens_typed_as_text_are_plain_text(stack):
    response = tokenize(stack.gateway, CHATS["control tokens typed as text stay text"])
    body = list(response.token_ids)[2:-1]  # between <s>[INST] and [/INST]
    assert not set(body) & {1, 2, 3, 4, 10, 12, 13}
