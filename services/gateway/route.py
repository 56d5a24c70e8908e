"""A request's way to the decoder: its messages checked, its images resolved and looked up in the cache, the chat
tokenized, the context checked, the missing images encoded; and storing images ahead of time (PutImages).

The route is straight: the images' bytes are decoded, hashed and their headers read (off the event loop), the
cache is asked about all of them in one round trip, and the encodes of the missing ones start at once, while the
chat is tokenized, unless the prompt could be too long for the context (then only once tokenization said it is
not: an over-long prompt is refused before anything is encoded).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from services.gateway import metrics
from services.gateway.config import GatewayConfig
from services.gateway.decoders import DecoderPool
from services.gateway.images import ImageFile, ImageResolver
from services.gateway.outputs import Output, choice_seeds, resolve_output
from services.gateway.prompt import Prompt, PromptBuilder, PromptImage
from services.gateway.request import ChatInput, ChatMessage, ImageSource, Role, Sampling, TextPart
from services.gateway.vision_pool import VisionPool
from shared.errors import DeadlineExceeded, ImageNotCached, InvalidRequest, Overloaded
from shared.generation import GenerateRequest, ImageRef
from shared.structured_output import FormatCompiler

# Prompt tokens a message may add beyond its text and images ([INST] and [/INST], an end of turn, the "\n\n" after
# a system prompt, a tool result's markers and JSON), the prompt beyond its messages (BOS, the tools' markers), and
# a tool beyond its name, description and parameters (its JSON): bounds, for the check before tokenization.
_TOKENS_PER_MESSAGE = 32
_TOKENS_PER_PROMPT = 8
_TOKENS_PER_TOOL = 64


@dataclass(frozen=True, slots=True)
class RequestImages:
    """A request's images once resolved and looked up in the cache."""

    files: list[ImageFile]                 # in the order of the request
    missing: list[ImageFile]               # distinct images with bytes and no valid cached embedding
    ref_grids: dict[str, tuple[int, int]]  # the patch grid of each image sent by reference, from the cache

    @property
    def by_field(self) -> dict[str, ImageFile]:
        return {file.field: file for file in self.files}


@dataclass(frozen=True, slots=True)
class Prepared:
    """A chat ready for a decoder."""

    prompt: Prompt
    request: GenerateRequest
    encoded: frozenset[str]   # images encoded for it (the others were cached)
    output: Output


@dataclass(frozen=True, slots=True)
class StoredImage:
    """An image of a PutImages request once its embedding is cached."""

    image: PromptImage
    was_cached: bool    # already cached before this request: nothing was encoded for it


def give_up_at(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s


def remaining(give_up: float | None) -> float | None:
    return None if give_up is None else give_up - time.monotonic()


def _check_content(message: ChatMessage) -> None:
    """A message says something: text, images, or (an assistant's) tool calls; no text part is empty."""
    if not message.parts and not message.tool_calls:
        raise InvalidRequest(f"{message.field}.content",
                             "a message needs content (or, from the assistant, tool calls)")
    if message.tool_calls:
        return   # OpenAI clients send an assistant's tool calls with the content "": nothing to tokenize, no harm
    for j, part in enumerate(message.parts):
        if isinstance(part, TextPart) and not part.text:
            raise InvalidRequest(f"{message.field}.content[{j}].text", "empty text")


def _discard(task: asyncio.Task) -> None:
    """Stops waiting for a task nobody needs any more (its error, if it had one, is not worth a warning)."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())


class Route:
    def __init__(self, config: GatewayConfig, builder: PromptBuilder, resolver: ImageResolver, pool: VisionPool,
                 decoders: DecoderPool, model_context: int, formats: FormatCompiler) -> None:
        self.config = config
        self.formats = formats   # output formats compiled here too: one that cannot be is refused before any work
        self.builder = builder
        self.resolver = resolver
        self.pool = pool
        self.decoders = decoders
        self.model_context = model_context   # the model's own (or --max-model-len), while no decoder says less

    @property
    def context_length(self) -> int:
        """Prompt + max_tokens at most: the smallest context of the decoders serving now."""
        return min(self.decoders.context_length() or self.model_context, self.model_context)

    async def prepare(self, chat: ChatInput, sampling: Sampling, give_up: float | None) -> Prepared:
        num_choices = self._num_choices(chat)
        output = await resolve_output(chat, self.formats)
        images = await self._images(self._check_messages(chat), give_up)
        if images.missing and await self.decoders.are_all_at_capacity():
            # Refused before the encodes, which cost far more than the decoder's own refusal would (a text-only
            # request is left to the decoders, whose count is exact).
            raise Overloaded("decoders are full (every one at its admission capacity); retry later")
        context = self.context_length
        encoding = None
        if images.missing and (self._prompt_bound(chat, images, output) + (sampling.requested_max_tokens or 1)
                               <= context):
            encoding = asyncio.create_task(self.encode(images.missing, chat.request_id, give_up))
        try:
            prompt = await self._tokenize(chat, images, output)
            max_tokens = self._max_tokens(prompt, sampling, context)
            encoded = await (encoding or self.encode(images.missing, chat.request_id, give_up))
        except BaseException:
            if encoding is not None:
                _discard(encoding)
            raise
        params = sampling.resolved(max_tokens)
        request = GenerateRequest(
            request_id=chat.request_id, prompt_token_ids=prompt.token_ids, sampling=params,
            images=[ImageRef(image.sha256, image.grid_height, image.grid_width) for image in prompt.images],
            n=num_choices, seeds=choice_seeds(params.seed, num_choices), format=output.format)
        return Prepared(prompt, request, encoded, output)

    async def prompt(self, chat: ChatInput, timeout_s: float | None = None) -> Prompt:
        """The chat's prompt alone (Tokenize): nothing is encoded."""
        output = await resolve_output(chat, self.formats)
        images = await self._images(self._check_messages(chat), give_up_at(timeout_s))
        return await self._tokenize(chat, images, output)

    def _num_choices(self, chat: ChatInput) -> int:
        n = 1 if chat.n is None else chat.n
        if not 1 <= n <= self.config.max_n:
            raise InvalidRequest("n", f"must be in [1, {self.config.max_n}], got {n}")
        return n

    async def put_images(self, sources: list[ImageSource], request_id: str,
                         timeout_s: float | None) -> list[StoredImage]:
        """Validates the images like Chat does and has the missing ones encoded; one StoredImage per source."""
        give_up = give_up_at(timeout_s)
        if not sources:
            raise InvalidRequest("images", "at least one image is needed")
        if len(sources) > self.config.max_images:
            raise InvalidRequest("images", f"at most {self.config.max_images} images, got {len(sources)}")
        images = await self._images(sources, give_up)
        described = [self.builder.describe(file, images.ref_grids) for file in images.files]
        encoded = await self.encode(images.missing, request_id, give_up)
        return [StoredImage(image, image.sha256 not in encoded) for image in described]

    async def encode(self, missing: list[ImageFile], request_id: str, give_up: float | None) -> frozenset[str]:
        timeout = self.config.encode_timeout_s
        if give_up is not None:
            timeout = min(timeout, give_up - time.monotonic())
            if timeout <= 0:
                raise DeadlineExceeded("deadline exceeded before the images were encoded")
        return await self.pool.encode(missing, request_id, timeout)

    async def gone(self, prompt: Prompt) -> list[ImageFile]:
        """The prompt's images no longer cached, to encode again; one sent by reference only cannot be."""
        headers = await self.pool.probe([image.sha256 for image in prompt.images])
        gone: dict[str, ImageFile] = {}
        for image in prompt.images:
            if headers[image.sha256] is None and image.data is not None:
                gone.setdefault(image.sha256, ImageFile(image.sha256, image.data, image.field))
        for image in prompt.images:
            if headers[image.sha256] is None and image.sha256 not in gone:
                raise ImageNotCached(f"{image.field}.sha256: image {image.sha256} is not cached; send its bytes",
                                     image.sha256)
        return list(gone.values())

    def _check_messages(self, chat: ChatInput) -> list[ImageSource]:
        if not chat.messages:
            raise InvalidRequest("messages", "at least one message is needed")
        images = []
        for message in chat.messages:
            if message.role is None:
                raise InvalidRequest(f"{message.field}.role", "must be system, user or assistant, or tool")
            _check_content(message)
            for part in message.parts:
                if isinstance(part, ImageSource):
                    if message.role is not Role.USER:
                        raise InvalidRequest(part.field, "only user messages may hold images")
                    images.append(part)
        last = chat.messages[-1]
        if not (last.role in (Role.USER, Role.TOOL) or (last.role is Role.ASSISTANT and last.prefix)):
            raise InvalidRequest(f"{last.field}.role", "the last message must be the user's (or a tool's result, or "
                                 "the start of the assistant's answer with prefix)")
        # Counted before anything is decoded or hashed.
        if len(images) > self.config.max_images:
            raise InvalidRequest("messages", f"at most {self.config.max_images} images, got {len(images)}")
        return images

    async def _images(self, sources: list[ImageSource], give_up: float | None) -> RequestImages:
        files = await self.resolver.resolve(sources, remaining(give_up))
        headers = await self.pool.probe([file.sha256 for file in files]) if files else {}
        ref_grids, missing = {}, {}
        for file in files:
            header = headers[file.sha256]
            if file.data is None:
                if header is None:
                    raise ImageNotCached(f"{file.field}.sha256: image {file.sha256} is not cached; send its bytes",
                                         file.sha256)
                ref_grids[file.sha256] = (header.grid_height, header.grid_width)
            elif header is None:
                missing.setdefault(file.sha256, file)
        metrics.CACHE_LOOKUPS.labels("miss").inc(len(missing))
        metrics.CACHE_LOOKUPS.labels("hit").inc(len(headers) - len(missing))
        return RequestImages(files, list(missing.values()), ref_grids)

    async def _tokenize(self, chat: ChatInput, images: RequestImages, output: Output) -> Prompt:
        # mistral-common is CPU work: keep the event loop free for other streams.
        return await asyncio.to_thread(self.builder.build, chat.messages, images.by_field, images.ref_grids,
                                       output.tools)

    def _prompt_bound(self, chat: ChatInput, images: RequestImages, output: Output) -> int:
        """A bound on the chat's prompt tokens, from its text's bytes (a token is a byte at least) and its images'
        grids, for the check that needs no tokenization."""
        num_tokens = _TOKENS_PER_PROMPT + _TOKENS_PER_MESSAGE * len(chat.messages)
        if output.tools is not None:
            num_tokens += sum(_TOKENS_PER_TOOL + len(tool.name.encode()) + len(tool.description.encode())
                              + len(tool.parameters.encode()) for tool in chat.tools)
        for message in chat.messages:
            num_tokens += sum(_TOKENS_PER_TOOL + len(call.name.encode()) + len(call.arguments.encode())
                              for call in message.tool_calls)
        by_field = images.by_field
        for message in chat.messages:
            for part in message.parts:
                if isinstance(part, TextPart):
                    num_tokens += len(part.text.encode())
                else:
                    file = by_field[part.field]
                    grid_height, grid_width = (self.builder.grid(file.header) if file.header is not None
                                               else images.ref_grids[file.sha256])
                    num_tokens += grid_height * (grid_width + 1)
        return num_tokens

    def _max_tokens(self, prompt: Prompt, sampling: Sampling, context: int) -> int:
        room = context - len(prompt.token_ids)
        if room <= 0:   # the prompt alone leaves no room for a token: whatever max_tokens says, it is the messages
            raise InvalidRequest("messages", f"the prompt has {len(prompt.token_ids)} tokens, the context "
                                 f"length is {context}")
        if sampling.requested_max_tokens is None:
            return min(self.config.default_max_tokens, room)
        if sampling.requested_max_tokens > room:
            raise InvalidRequest("sampling.max_tokens", f"prompt ({len(prompt.token_ids)} tokens) + max_tokens "
                                 f"({sampling.requested_max_tokens}) exceeds the context length of {context}")
        return sampling.requested_max_tokens
