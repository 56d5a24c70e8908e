"""The embedding cache: key scheme and the binary value format shared by the vision pool and the decoders.

Key: `pixtral:emb:<model fingerprint>:<sha256 of the image bytes>`.
Value: a fixed 80-byte header followed by the raw features, row-major:

    offset size  field
    0      8     magic b"PXTEMB02" (version 2: version 1 had no checksum; its values are misses)
    8      1     dtype code (1 float32, 2 bfloat16, 3 float16)
    9      3     zero
    12     4     grid height (u32, little-endian): patch rows
    16     4     grid width  (u32): patch columns; rows of features = grid height * grid width
    20     4     columns (u32): feature size (the vision hidden size: features are stored before the projector)
    24     16    model fingerprint (ASCII hex)
    40     32    sha256 of the image bytes (raw)
    72     8     xxh3_64 of the payload (u64)
    80     ...   the payload: rows * columns * itemsize bytes

Nothing is unpickled: a value is parsed by this header alone, and one that fails any check is a miss. The header
alone (`parse_header`, `check_length`) is what a cache probe reads; a reader of the whole value (`decode_entry`)
also checks the payload against its checksum, so a value corrupted inside its payload (a flipped bit, a partial
overwrite) is a miss and a recompute rather than features that silently differ.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass

import torch
import xxhash

KEY_PREFIX = "pixtral:emb:"
MAGIC = b"PXTEMB02"
_HEADER = struct.Struct("<8sB3xIII16s32sQ")
HEADER_BYTES = _HEADER.size
MAX_GRID = 64  # 1024 px / 16 px per patch
_DTYPES = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class CorruptEntry(ValueError):
    """A cache value that fails validation: treated as a miss and overwritten by a fresh encode."""


def cache_key(fingerprint: str, sha256: str) -> str:
    return f"{KEY_PREFIX}{fingerprint}:{sha256}"


@dataclass(frozen=True, slots=True)
class EntryHeader:
    dtype: torch.dtype
    grid_height: int
    grid_width: int
    num_columns: int
    fingerprint: str
    sha256: str
    payload_checksum: int = 0   # xxh3_64 of the payload

    @property
    def num_rows(self) -> int:
        return self.grid_height * self.grid_width

    @property
    def payload_bytes(self) -> int:
        return self.num_rows * self.num_columns * self.dtype.itemsize

    @property
    def total_bytes(self) -> int:
        return HEADER_BYTES + self.payload_bytes


def payload_checksum(payload) -> int:
    """xxh3_64 of a payload (bytes or any buffer): fast enough to check every read (tens of GB/s), not a MAC."""
    return xxhash.xxh3_64_intdigest(payload)


def encode_entry(features: torch.Tensor, grid: tuple[int, int], fingerprint: str, sha256: str) -> bytes:
    """[grid_h * grid_w, columns] features -> the cache value."""
    grid_height, grid_width = grid
    if features.dim() != 2 or features.shape[0] != grid_height * grid_width:
        raise ValueError(f"features {tuple(features.shape)} do not match grid {grid}")
    features = features.detach().contiguous().cpu()
    payload = features.view(torch.uint8).numpy()
    header = _HEADER.pack(MAGIC, _CODES[features.dtype], grid_height, grid_width, features.shape[1],
                          fingerprint.encode("ascii"), bytes.fromhex(sha256), payload_checksum(payload))
    return header + payload.tobytes()


def parse_header(prefix: bytes, *, fingerprint: str, sha256: str, num_columns: int | None = None) -> EntryHeader:
    """Validates the first HEADER_BYTES of a value against what the reader expects."""
    if len(prefix) < HEADER_BYTES:
        raise CorruptEntry("value shorter than its header")
    magic, code, grid_height, grid_width, columns, raw_fp, raw_sha, checksum = _HEADER.unpack_from(prefix)
    if magic != MAGIC:
        raise CorruptEntry("bad magic")
    if code not in _DTYPES:
        raise CorruptEntry(f"unknown dtype code {code}")
    if not (1 <= grid_height <= MAX_GRID and 1 <= grid_width <= MAX_GRID):
        raise CorruptEntry(f"grid {grid_height}x{grid_width} out of range")
    if raw_fp != fingerprint.encode("ascii"):
        raise CorruptEntry("model fingerprint differs")
    if raw_sha != bytes.fromhex(sha256):
        raise CorruptEntry("image hash differs")
    if num_columns is not None and columns != num_columns:
        raise CorruptEntry(f"{columns} columns, expected {num_columns}")
    return EntryHeader(_DTYPES[code], grid_height, grid_width, columns, fingerprint, sha256, checksum)


def check_length(header: EntryHeader, total_bytes: int) -> None:
    if total_bytes != header.total_bytes:
        raise CorruptEntry(f"value has {total_bytes} bytes, header says {header.total_bytes}")


def decode_entry(value: bytes, *, fingerprint: str, sha256: str, num_columns: int,
                 grid: tuple[int, int] | None = None) -> torch.Tensor:
    """The cache value -> [rows, columns] features: a read-only view of `value` (no copy; it keeps `value`
    alive). Copy it before writing to it. The payload is checked against the header's checksum."""
    header = parse_header(value, fingerprint=fingerprint, sha256=sha256, num_columns=num_columns)
    check_length(header, len(value))
    if grid is not None and (header.grid_height, header.grid_width) != tuple(grid):
        raise CorruptEntry(f"grid {header.grid_height}x{header.grid_width}, expected {grid[0]}x{grid[1]}")
    if payload_checksum(memoryview(value)[HEADER_BYTES:]) != header.payload_checksum:
        raise CorruptEntry("payload checksum differs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-writable buffer": the view is only read
        features = torch.frombuffer(value, dtype=header.dtype, offset=HEADER_BYTES,
                                    count=header.num_rows * header.num_columns)
    features = features.view(header.num_rows, header.num_columns)
    if not torch.isfinite(features).all():
        raise CorruptEntry("non-finite features")
    return features
