"""Chat -> prompt token ids, with mistral-common's Pixtral tokenizer, from image sizes alone.

Token ids equal `MistralTokenizer.encode_chat_completion` on the same chat (system prompt placement, turn
markers, a lone trailing image moved first, image token grids): the request is handed to mistral-common itself.
Only its image encoder is replaced by one that computes an image's tokens from its size with the reference's own
rule (`ImageEncoder._image_to_num_tokens`) and leaves the pixels to the vision workers: each image enters opened
lazily (images.py read its header), nothing decoded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import ImageChunk
from mistral_common.tokens.tokenizers.image import ImageEncoder, ImageEncoding
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from services.gateway.images import ImageFile
from services.gateway.request import ChatMessage, ImageSource, TextPart
from shared.chat_messages import ChatTurn, chat_request
from shared.errors import InvalidRequest
from shared.tool_calls import ChatFormatError, ToolCall, ToolSetup
from shared.tokenizer import TOKENIZER_FILE

PATCH_SIZE = 16


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
    def __init__(self, tokenizer_file: Path = TOKENIZER_FILE) -> None:
        # A tokenizer of its own: its image encoder is replaced, which must not leak to other users.
        self.tokenizer = MistralTokenizer.from_file(str(tokenizer_file))
        instruct = self.tokenizer.instruct_tokenizer
        base = instruct.image_encoder
        instruct.image_encoder = _GridOnlyImageEncoder(base.image_config, base.special_ids)

    @property
    def max_image_side(self) -> int:
        return self.tokenizer.instruct_tokenizer.image_encoder.image_config.max_image_size

    def grid(self, image: Image.Image) -> tuple[int, int]:
        """(grid_height, grid_width) of an image after the reference's resize (from its size alone)."""
        grid_width, grid_height = self.tokenizer.instruct_tokenizer.image_encoder._image_to_num_tokens(image)
        return grid_height, grid_width

    def _stand_in(self, file: ImageFile, ref_grids: dict[str, tuple[int, int]]) -> Image.Image:
        """The file opened lazily (only its size is read), or for a reference a blank stand-in of the cached
        grid's size: the same tokens."""
        if file.header is None:
            grid_height, grid_width = ref_grids[file.sha256]
            image = Image.new("1", (grid_width * PATCH_SIZE, grid_height * PATCH_SIZE))
        else:
            image = file.header
        image.info["pixtral_sha256"] = file.sha256
        return image

    def describe(self, file: ImageFile, ref_grids: dict[str, tuple[int, int]]) -> PromptImage:
        """One image on its own: its size and patch grid as a prompt would have them."""
        image = self._stand_in(file, ref_grids)
        grid_height, grid_width = self.grid(image)
        return PromptImage(file.sha256, file.data, *image.size, grid_height, grid_width, file.field)

    def build(self, messages: list[ChatMessage], files: dict[str, ImageFile], ref_grids: dict[str, tuple[int, int]],
              tools: ToolSetup | None = None) -> Prompt:
        """`files` maps each image part's field to its resolved file; `ref_grids` has the grids of references;
        `tools` the request's tools (written into the prompt)."""
        def image_chunk(part: ImageSource) -> ImageChunk:
            return ImageChunk(image=self._stand_in(files[part.field], ref_grids))
        try:
            request = chat_request([_turn(message) for message in messages], tools, image_chunk)
            encoded = self.tokenizer.encode_chat_completion(request)
        except ChatFormatError as error:
            raise InvalidRequest(error.field, error.problem) from None
        except (MistralCommonException, ValueError, AssertionError) as error:
            raise InvalidRequest("messages", _first_line(error)) from None
        by_sha = {file.sha256: file for file in files.values()}
        images = []
        for marker in encoded.images:
            sha, width, height, grid_height, grid_width = marker[()]
            file = by_sha[sha]
            images.append(PromptImage(sha, file.data, width, height, grid_height, grid_width, file.field))
        return Prompt(list(encoded.tokens), images)


def _turn(message: ChatMessage) -> ChatTurn:
    """The domain's message as mistral-common's request builder takes it (images stay the request's parts)."""
    calls = []
    for call in message.tool_calls:
        try:
            arguments = json.loads(call.arguments) if call.arguments.strip() else {}
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise InvalidRequest(f"{call.field}.arguments", "must be a JSON object")
        calls.append(ToolCall(call.id, call.name, arguments))
    return ChatTurn(role=message.role.value,
                    content=tuple(part.text if isinstance(part, TextPart) else part for part in message.parts),
                    tool_calls=tuple(calls), tool_call_id=message.tool_call_id or None, is_prefix=message.prefix)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
