"""Image files: what the service accepts, read from headers before any decoding, and Pixtral preprocessing.

Preprocessing is mistral-common's own ImageEncoder (the reference): RGB (transparency over white), scale so
no side exceeds 1024 px, each side up to a multiple of 16, cv2 bicubic, CLIP mean/std. EXIF orientation is not
applied, as in the reference, so the same bytes always give the same pixels and the same cache key.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from mistral_common.protocol.instruct.chunk import ImageChunk
from PIL import Image

from shared.tokenizer import load_tokenizer

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# Pillow's own bomb guard raises from inside open(); the service applies its own limit from the header instead.
Image.MAX_IMAGE_PIXELS = None


class InvalidImage(ValueError):
    """Bytes the service will not encode; the message is safe to show to the caller."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Opens the file lazily (header only) and checks format and pixel count before anything is decoded."""
    if not data:
        raise InvalidImage("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.UnidentifiedImageError:
        raise InvalidImage(f"unsupported image format: expected one of {', '.join(ALLOWED_FORMATS)}") from None
    except Exception as error:  # noqa: BLE001 - any decoder failure on a header is a bad image
        raise InvalidImage(f"unreadable image header ({type(error).__name__})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidImage(f"image has {width * height} pixels ({width}x{height}), over the limit of {max_pixels}")
    return image


def preprocess(data: bytes, max_pixels: int, tokenizer_path: Path | None = None) -> np.ndarray:
    """Image file -> (3, H, W) float32 pixels, H and W multiples of 16, exactly as mistral-common makes them (with
    the image settings of the tokenizer at `tokenizer_path`, default mistral-common's)."""
    image = open_image(data, max_pixels)
    try:
        image.load()
    except OSError as error:
        if "truncated" in str(error).lower():
            raise InvalidImage("image data is truncated") from None
        raise InvalidImage(f"image data cannot be decoded ({type(error).__name__})") from None
    except Exception as error:  # noqa: BLE001
        raise InvalidImage(f"image data cannot be decoded ({type(error).__name__})") from None
    encoder = load_tokenizer(tokenizer_path).instruct_tokenizer.image_encoder
    try:
        return encoder(ImageChunk(image=image)).image
    except Exception as error:  # noqa: BLE001 - a mode the reference cannot convert
        raise InvalidImage(f"image cannot be converted to RGB ({type(error).__name__})") from None


def warm_up_preprocessing(tokenizer_path: Path | None = None) -> None:
    """Loads what preprocess() uses before the first job: mistral-common's image encoder comes with the whole
    tokenizer, about a second to load, which the first images of a worker would otherwise wait for."""
    data = io.BytesIO()
    Image.new("RGB", (32, 32)).save(data, "PNG")
    preprocess(data.getvalue(), max_pixels=32 * 32, tokenizer_path=tokenizer_path)
