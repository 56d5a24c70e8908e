"""Corrupt embedding-cache entries of every kind (reliability case 15): each is a miss, recomputed and overwritten,
and never reaches the model: the request's output equals the clean run's.

Some corruptions show in the header (the gateway's probe treats them as a miss); the others only in the payload
or against the prompt (the decoder refuses them, the gateway re-encodes and retries). A value well formed in every
field whose payload changed (one flipped bit, one other finite number) fails the payload's checksum in the header:
without it, the model would get slightly different features and nobody would know. The decoder keeps no local
copy of features here (`--feature-cache-mib 0`), so every request reads what Redis holds.
"""

from __future__ import annotations

import itertools
import pickle
import struct

import grpc
import numpy as np
import pytest

from shared.fingerprints import vision_fingerprint
from shared.embedding_cache import HEADER_BYTES, cache_key, decode_entry
from shared.images import sha256_hex
from tests.reference import chat_request
from tests.support import Stack, assert_nothing_left, call_chat, image_bytes, noise_image

MAX_TOKENS = 6
COLUMNS = 64   # the tiny model's vision hidden size


def with_float(value: bytes, index: int, number: float) -> bytes:
    offset = HEADER_BYTES + 4 * index
    return value[:offset] + struct.pack("<f", number) + value[offset + 4:]


def flip_bit(value: bytes, offset: int) -> bytes:
    """The lowest bit of one byte: inside the payload, a float32 that stays finite and nearly equal."""
    return value[:offset] + bytes([value[offset] ^ 1]) + value[offset + 1:]


def header_field(value: bytes, offset: int, fmt: str, field_value) -> bytes:
    packed = struct.pack(fmt, field_value)
    return value[:offset] + packed + value[offset + len(packed):]


def regrid(value: bytes, height: int, width: int, columns: int = COLUMNS) -> bytes:
    return header_field(header_field(header_field(value, 12, "<I", height), 16, "<I", width), 20, "<I", columns)


# Each takes the clean value of an image whose patch grid is 3x2 (32x48 pixels).
CORRUPTIONS = {
    "bad magic": lambda v: b"PXTEMB99" + v[8:],
    "unknown dtype code": lambda v: header_field(v, 8, "<B", 9),
    "other dtype code (bfloat16 over float32 bytes)": lambda v: header_field(v, 8, "<B", 2),
    "grid out of range": lambda v: header_field(v, 12, "<I", 999),
    "grid transposed, same size": lambda v: regrid(v, 2, 3),
    "other columns, same size": lambda v: regrid(v, 6, 2, COLUMNS // 2),
    "other model fingerprint": lambda v: v[:24] + b"f" * 16 + v[40:],
    "other image hash": lambda v: v[:40] + bytes(32) + v[72:],
    "truncated header": lambda v: v[:40],
    "truncated payload": lambda v: v[:-4],
    "trailing bytes": lambda v: v + bytes(4),
    "NaN in the payload": lambda v: with_float(v, 5, float("nan")),
    "infinity in the payload": lambda v: with_float(v, 77, float("-inf")),
    "a bit flipped in the payload": lambda v: flip_bit(v, HEADER_BYTES + 4 * 10),
    "another finite number in the payload": lambda v: with_float(v, 33, 0.5),
    "other payload checksum": lambda v: header_field(v, 72, "<Q", struct.unpack_from("<Q", v, 72)[0] ^ 1 << 40),
    "a value of format version 1 (no checksum)": lambda v: b"PXTEMB01" + v[8:72] + v[HEADER_BYTES:],
    "junk of the same length": lambda v: np.random.default_rng(0).bytes(len(v)),
    "empty": lambda v: b"",
    "a pickle": lambda v: pickle.dumps({"features": [1.0, 2.0]}),
}

_seeds = itertools.count(8000)


@pytest.fixture(scope="module")
def stack(tiny_model, module_redis, tmp_path_factory):
    running = Stack(tiny_model, module_redis.url, tmp_path_factory.mktemp("corrupt-cache"), with_metrics=True,
                    decoder_args=("--feature-cache-mib", "0")).start()
    yield running
    running.stop()


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_entry_is_a_miss_recomputed_overwritten_and_never_reaches_the_model(stack, module_redis,
                                                                                      tiny_model, kind):
    client = module_redis.client()
    image = image_bytes(noise_image(32, 48, seed=next(_seeds)))
    sha = sha256_hex(image)
    key = cache_key(vision_fingerprint(tiny_model), sha)
    request = chat_request([("user", ["Describe it.", image])], max_tokens=MAX_TOKENS, temperature=0.0)

    clean = call_chat(stack.gateway, request)
    assert clean.code == grpc.StatusCode.OK and clean.last.usage.encoded_images == 1
    value = client.get(key)
    decode_entry(value, fingerprint=vision_fingerprint(tiny_model), sha256=sha, num_columns=COLUMNS, grid=(3, 2))

    client.set(key, CORRUPTIONS[kind](value))
    again = call_chat(stack.gateway, request)
    assert again.code == grpc.StatusCode.OK, again.details
    assert again.token_ids == clean.token_ids
    assert (again.last.usage.encoded_images, again.last.usage.cached_images) == (1, 0)
    assert client.get(key) == value, "the entry was not overwritten with the recomputed embedding"
    assert_nothing_left(stack, client)
