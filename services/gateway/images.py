"""A request's images as the caller gave them -> their bytes, hashes and sizes, checked before anything is decoded.

http(s) URLs are fetched first, all at once (shared/url_fetch.py); then base64 payloads are decoded, bytes hashed
and headers read in a worker thread: a 20 MiB data: URL is ~150 ms of CPU, which on the event loop would hold every
other stream of the gateway.
"""

from __future__ import annotations

import asyncio
import binascii
import re
from dataclasses import dataclass, field, replace

from PIL import Image

from services.gateway.request import ImageSource
from shared.errors import InvalidRequest
from shared.images import InvalidImage, open_image, sha256_hex
from shared.url_fetch import ImageUrlError, UrlFetcher, is_http_url

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[^,]*)?;base64,", re.IGNORECASE)
_BASE64_PIECE = 1 << 20   # characters decoded at a time: a multiple of 4, so that only the last piece may be padded


@dataclass(frozen=True, slots=True)
class ImageFile:
    """A request's image once resolved: its bytes and header, or only its hash when sent by reference."""

    sha256: str
    data: bytes | None               # None when sent by reference
    field: str                       # where it sits in the request, e.g. "messages[0].content[1].image"
    # The file opened lazily (its header read, no pixel decoded: what tokenization needs); None for a reference.
    header: Image.Image | None = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) of the file; None for a reference."""
        return None if self.header is None else self.header.size


def _data_url_bytes(url: str, field: str) -> bytes:
    match = _DATA_URL.match(url)
    if not match and url[:5].lower() == "data:":
        media_type = url[5:].split(",", 1)[0].split(";", 1)[0][:64] or "text/plain"   # RFC 2397's default
        if not media_type.lower().startswith("image/"):
            raise InvalidRequest(f"{field}.url", f"a data: URL of media type {media_type!r}, not an image: only "
                                 "data:image/...;base64 URLs are accepted")
        raise InvalidRequest(f"{field}.url", "a data:image URL must be base64 (data:image/...;base64,...)")
    if not match:
        scheme = url.split(":", 1)[0][:16] if ":" in url else ""
        raise InvalidRequest(f"{field}.url", "only data:image/...;base64 URLs (and http(s) URLs where the gateway "
                             "allows them) are accepted" + (f", not {scheme}:" if scheme else ""))
    payload = url[match.end():]
    try:
        # In pieces: one call over a 20 MiB payload would hold the interpreter lock, and with it the event loop,
        # for its whole length (hashlib, unlike binascii, lets go of the lock while it hashes).
        return b"".join(binascii.a2b_base64(payload[start:start + _BASE64_PIECE], strict_mode=True)
                        for start in range(0, len(payload), _BASE64_PIECE))
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field}.url", "payload is not valid base64") from None


class ImageResolver:
    def __init__(self, max_bytes: int, max_pixels: int, fetcher: UrlFetcher | None) -> None:
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.fetcher = fetcher   # None: http(s) image URLs are refused

    async def resolve(self, sources: list[ImageSource], timeout_s: float | None) -> list[ImageFile]:
        """Every image part's bytes, hash and size, in the order given."""
        fetched = await asyncio.gather(*(self._fetch(source, timeout_s) for source in sources))
        if all(source.sha256 is not None for source in fetched):
            return [self._resolve(source) for source in fetched]   # hashes only: nothing to decode
        return await asyncio.to_thread(lambda: [self._resolve(source) for source in fetched])

    async def _fetch(self, source: ImageSource, timeout_s: float | None) -> ImageSource:
        if source.url is None or not is_http_url(source.url):
            return source
        if self.fetcher is None:
            raise InvalidRequest(f"{source.field}.url", "http(s) image URLs are not enabled on this gateway; send "
                                 "the bytes or a data: URL")
        try:
            data = await self.fetcher.fetch(source.url, timeout_s)
        except ImageUrlError as error:
            raise InvalidRequest(f"{source.field}.url", str(error)) from None
        return replace(source, url=None, data=data)

    def _resolve(self, source: ImageSource) -> ImageFile:
        if source.sha256 is not None:
            if not _SHA256.match(source.sha256):
                raise InvalidRequest(f"{source.field}.sha256", "must be 64 lowercase hex characters")
            return ImageFile(source.sha256, None, source.field)
        data = _data_url_bytes(source.url, source.field) if source.url is not None else (source.data or b"")
        if not data:
            raise InvalidRequest(source.field, "empty image data")
        if len(data) > self.max_bytes:
            raise InvalidRequest(source.field, f"image of {len(data)} bytes, over the limit of {self.max_bytes}")
        try:
            header = open_image(data, self.max_pixels)   # the header only: format and pixel count checked
        except InvalidImage as error:
            raise InvalidRequest(source.field, str(error)) from None
        return ImageFile(sha256_hex(data), data, source.field, header)
