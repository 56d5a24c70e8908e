"""Chat -> prompt token ids, with mistral-common's Pixtral tokenizer, reading only image headers.

Token ids equal `MistralTokenizer.encode_chat_completion` on the same chat (system prompt placement, turn
markers, a lone trailing image moved first, image token grids): the request is handed to mistral-common itself.
Only its image encoder is replaced by one that computes an image's tokens from its size with the reference's own
rule (`ImageEncoder._image_to_num_tokens`) and leaves the pixels to the vision workers.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.image import ImageEncoder, ImageEncoding
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from services.gateway.request import ChatMessage, ImageSource, Role, TextPart
from shared.errors import InvalidRequest
from shared.images import InvalidImage, open_image, sha256_hex
from shared.tokenizer import TOKENIZER_FILE

PATCH_SIZE = 16
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[^,]*)?;base64,", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ImageFile:
    """A request's image once resolved: its bytes, or only its hash when sent by reference."""

    sha256: str
    data: bytes | None
    field: str


@dataclass(frozen=True, slots=True)
class PromptImage:
    sha256: str
    data: bytes | None      # None when sent by reference (already cached)
    width: int              # pixels of the file; for a reference, of the resized image
    height: int
    grid_height: int        # rows of [IMG] tokens
    grid_width: int         # [IMG] tokens per row
    field: str

    @property
    def num_tokens(self) -> int:
        return self.grid_height * (self.grid_width + 1)


@dataclass(frozen=True, slots=True)
class Prompt:
    token_ids: list[int]
    images: list[PromptImage]   # in the order their tokens appear

    @property
    def num_image_tokens(self) -> int:
        return sum(image.num_tokens for image in self.images)


def resolve_image(source: ImageSource, max_bytes: int) -> ImageFile:
    """Bytes and hash of an image part; checks what can be checked without decoding."""
    if source.sha256 is not None:
        if not _SHA256.match(source.sha256):
            raise InvalidRequest(f"{source.field}.sha256: must be 64 lowercase hex characters")
        return ImageFile(source.sha256, None, source.field)
    if source.url is not None:
        data = _data_url_bytes(source.url, source.field)
    else:
        data = source.data or b""
    if not data:
        raise InvalidRequest(f"{source.field}: empty image data")
    if len(data) > max_bytes:
        raise InvalidRequest(f"{source.field}: image of {len(data)} bytes, over the limit of {max_bytes}")
    return ImageFile(sha256_hex(data), data, source.field)


def _data_url_bytes(url: str, field: str) -> bytes:
    match = _DATA_URL.match(url)
    if not match:
        scheme = url.split(":", 1)[0][:16] if ":" in url else ""
        raise InvalidRequest(f"{field}.url: only data:image/...;base64 URLs (and http(s) URLs where the gateway "
                             "allows them) are accepted" + (f", not {scheme}:" if scheme else ""))
    try:
        return base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field}.url: payload is not valid base64") from None


class _GridOnlyImageEncoder(ImageEncoder):
    """The reference's image tokens from the image size alone; pixels are left to the vision workers."""

    def __call__(self, content) -> ImageEncoding:
        image = content.image
        grid_width, grid_height = self._image_to_num_tokens(image)
        ids = self.special_ids
        tokens = ([ids.img] * grid_width + [ids.img_break]) * grid_height
        tokens[-1] = ids.img_end
        marker = np.empty((), dtype=object)  # carries which image this was, in the order tokens appear
        marker[()] = (image.info["pixtral_sha256"], *image.size, grid_height, grid_width)
        return ImageEncoding(tokens=tokens, image=marker)


class PromptBuilder:
    def __init__(self, max_image_pixels: int, tokenizer_path: Path = TOKENIZER_FILE) -> None:
        self.max_image_pixels = max_image_pixels
        # A tokenizer of its own: its image encoder is replaced, which must not leak to other users.
        self.tokenizer = MistralTokenizer.from_file(str(tokenizer_path))
        instruct = self.tokenizer.instruct_tokenizer
        base = instruct.image_encoder
        instruct.image_encoder = _GridOnlyImageEncoder(base.image_config, base.special_ids)

    def _open(self, file: ImageFile, ref_grids: dict[str, tuple[int, int]]) -> Image.Image:
        if file.data is None:
            # Sent by reference: a blank stand-in of the cached grid's size gives the same tokens.
            grid_height, grid_width = ref_grids[file.sha256]
            image = Image.new("1", (grid_width * PATCH_SIZE, grid_height * PATCH_SIZE))
        else:
            try:
                image = open_image(file.data, self.max_image_pixels)
            except InvalidImage as error:
                raise InvalidRequest(f"{file.field}: {error}") from None
        image.info["pixtral_sha256"] = file.sha256
        return image

    def describe(self, file: ImageFile, ref_grids: dict[str, tuple[int, int]]) -> PromptImage:
        """One image on its own: its size and patch grid as a prompt would have them (header only)."""
        image = self._open(file, ref_grids)
        grid_width, grid_height = self.tokenizer.instruct_tokenizer.image_encoder._image_to_num_tokens(image)
        return PromptImage(file.sha256, file.data, *image.size, grid_height, grid_width, file.field)

    def build(self, messages: list[ChatMessage], files: dict[str, ImageFile],
              ref_grids: dict[str, tuple[int, int]]) -> Prompt:
        """`files` maps each image part's field to its resolved file; `ref_grids` has the grids of references."""
        chat = []
        for message in messages:
            if message.role is Role.USER:
                content = [TextChunk(text=part.text) if isinstance(part, TextPart)
                           else ImageChunk(image=self._open(files[part.field], ref_grids))
                           for part in message.parts]
                chat.append(UserMessage(content=content))
            elif message.role is Role.SYSTEM:
                chat.append(SystemMessage(content=_text_of(message)))
            else:
                chat.append(AssistantMessage(content=_text_of(message)))
        try:
            encoded = self.tokenizer.encode_chat_completion(ChatCompletionRequest(messages=chat))
        except (MistralCommonException, ValueError, AssertionError) as error:
            raise InvalidRequest(f"messages: {_first_line(error)}") from None
        by_sha = {file.sha256: file for file in files.values()}
        images = []
        for marker in encoded.images:
            sha, width, height, grid_height, grid_width = marker[()]
            file = by_sha[sha]
            images.append(PromptImage(sha, file.data, width, height, grid_height, grid_width, file.field))
        return Prompt(list(encoded.tokens), images)


def _text_of(message: ChatMessage) -> str:
    return "".join(part.text for part in message.parts if isinstance(part, TextPart))


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
