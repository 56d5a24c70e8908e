"""The cache value format: exact round trip, and every kind of corruption is detected."""

from __future__ import annotations

import struct

import pytest
import torch
import xxhash

from shared.embedding_cache import (HEADER_BYTES, CorruptEntry, cache_key, check_length, decode_entry, encode_entry,
                                    parse_header)

FP, SHA = "0123456789abcdef", "ab" * 32


def test_round_trip_is_exact_for_each_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        features = torch.randn(6, 8).to(dtype)
        value = encode_entry(features, (2, 3), FP, SHA)
        assert len(value) == HEADER_BYTES + features.numel() * features.element_size()
        decoded = decode_entry(value, fingerprint=FP, sha256=SHA, num_columns=8, grid=(2, 3))
        assert decoded.dtype == dtype and torch.equal(decoded, features)


def test_the_header_carries_the_payloads_xxh3_64_and_a_version_2_magic():
    features = torch.randn(6, 8)
    value = encode_entry(features, (2, 3), FP, SHA)
    assert HEADER_BYTES == 80 and value[:8] == b"PXTEMB02"
    (checksum,) = struct.unpack_from("<Q", value, 72)
    assert checksum == xxhash.xxh3_64_intdigest(features.numpy().tobytes()) == xxhash.xxh3_64_intdigest(value[80:])
    header = parse_header(value[:HEADER_BYTES], fingerprint=FP, sha256=SHA, num_columns=8)
    check_length(header, len(value))
    assert header.payload_checksum == checksum and header.total_bytes == len(value)


def flip_bit(value: bytes, offset: int, bit: int = 0) -> bytes:
    return value[:offset] + bytes([value[offset] ^ (1 << bit)]) + value[offset + 1:]


def test_a_flipped_bit_anywhere_in_the_payload_is_caught_though_the_header_and_the_numbers_look_fine():
    value = encode_entry(torch.randn(6, 8), (2, 3), FP, SHA)
    for offset in (HEADER_BYTES, HEADER_BYTES + 101, len(value) - 1):
        corrupt = flip_bit(value, offset)   # the lowest mantissa bit of a float32 at most: still finite
        check_length(parse_header(corrupt, fingerprint=FP, sha256=SHA, num_columns=8), len(corrupt))
        assert torch.isfinite(torch.frombuffer(bytearray(corrupt[HEADER_BYTES:]), dtype=torch.float32)).all()
        with pytest.raises(CorruptEntry, match="checksum"):
            decode_entry(corrupt, fingerprint=FP, sha256=SHA, num_columns=8, grid=(2, 3))


def test_key_names_fingerprint_and_hash():
    assert cache_key(FP, SHA) == f"pixtral:emb:{FP}:{SHA}"


def corruptions(value: bytes):
    yield "truncated payload", value[:-1]
    yield "trailing bytes", value + b"\0"
    yield "truncated header", value[:20]
    yield "bad magic", b"X" + value[1:]
    yield "unknown dtype", value[:8] + b"\x09" + value[9:]
    yield "other fingerprint", value[:24] + b"f" * 16 + value[40:]
    yield "other image", value[:40] + b"\0" * 32 + value[72:]
    yield "wrong columns", value[:20] + struct.pack("<I", 9) + value[24:]
    yield "grid out of range", value[:12] + struct.pack("<I", 999) + value[16:]
    yield "pickle instead", b"\x80\x04\x95" + value[3:]
    yield "other checksum", value[:72] + struct.pack("<Q", struct.unpack_from("<Q", value, 72)[0] ^ 1) + value[80:]
    yield "version 1 (no checksum)", b"PXTEMB01" + value[8:72] + value[80:]


@pytest.mark.parametrize("name", [name for name, _ in corruptions(b"\0" * 200)])
def test_corrupt_values_are_rejected(name):
    value = encode_entry(torch.randn(6, 8), (2, 3), FP, SHA)
    corrupt = dict(corruptions(value))[name]
    with pytest.raises(CorruptEntry):
        decode_entry(corrupt, fingerprint=FP, sha256=SHA, num_columns=8, grid=(2, 3))


def test_non_finite_features_and_grid_mismatch_are_rejected():
    features = torch.randn(6, 8)
    features[3, 3] = float("nan")
    with pytest.raises(CorruptEntry):
        decode_entry(encode_entry(features, (2, 3), FP, SHA), fingerprint=FP, sha256=SHA, num_columns=8)
    with pytest.raises(CorruptEntry):
        decode_entry(encode_entry(torch.randn(6, 8), (2, 3), FP, SHA), fingerprint=FP, sha256=SHA,
                     num_columns=8, grid=(3, 2))
