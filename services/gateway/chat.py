"""The gateway's request logic: validate, tokenize, get images encoded, stream text from a decoder; and storing
images ahead of time (PutImages) so that later requests name them by hash."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace

from services.gateway import metrics
from services.gateway.config import GatewayConfig
from services.gateway.decoders import DecodeOutput, DecodeRequest, DecoderPool
from services.gateway.detokenizer import IncrementalDetokenizer, StopMatcher
from services.gateway.prompt import ImageFile, Prompt, PromptBuilder, PromptImage, resolve_image
from services.gateway.request import ChatInput, ImageSource, Role, Sampling, validate_sampling
from services.gateway.vision_pool import EnsureResult, VisionPool
from shared.errors import DeadlineExceeded, ImageNotCached, InvalidRequest, ServiceError
from shared.url_fetch import ImageUrlError, UrlFetcher, is_http_url

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int
    cached_images: int
    encoded_images: int


@dataclass(frozen=True, slots=True)
class ChatDelta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # on the last delta: "stop", "length", "cancelled" or "error"
    usage: Usage | None = None         # on the last delta


@dataclass(frozen=True, slots=True)
class StoredImage:
    """An image of a PutImages request once its embedding is cached."""

    image: PromptImage
    was_cached: bool    # already cached before this request: nothing was encoded for it


def _give_up(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s


def _remaining(give_up: float | None) -> float | None:
    return None if give_up is None else give_up - time.monotonic()


class ChatService:
    def __init__(self, config: GatewayConfig, builder: PromptBuilder, pool: VisionPool, decoders: DecoderPool,
                 max_model_len: int, fetcher: UrlFetcher | None = None) -> None:
        self.config = config
        self.builder = builder
        self.pool = pool
        self.decoders = decoders
        self.max_model_len = max_model_len
        self.fetcher = fetcher   # None: http(s) image URLs are refused

    # -- prompt -------------------------------------------------------------------------------------------------

    def _check_messages(self, chat: ChatInput) -> list[ImageSource]:
        if not chat.messages:
            raise InvalidRequest("messages: at least one message is needed")
        images = []
        for message in chat.messages:
            if message.role is None:
                raise InvalidRequest(f"{message.field}.role: must be system, user or assistant")
            for part in message.parts:
                if isinstance(part, ImageSource):
                    if message.role is not Role.USER:
                        raise InvalidRequest(f"{part.field}: only user messages may hold images")
                    images.append(part)
        if chat.messages[-1].role is not Role.USER:
            raise InvalidRequest(f"messages[{len(chat.messages) - 1}].role: the last message must be the user's")
        # Counted before anything is decoded or hashed.
        if len(images) > self.config.max_images:
            raise InvalidRequest(f"messages: at most {self.config.max_images} images, got {len(images)}")
        return images

    async def prompt(self, chat: ChatInput, timeout_s: float | None = None) -> Prompt:
        sources = self._check_messages(chat)
        files = await self._resolve(sources, _give_up(timeout_s))
        ref_grids = await self._reference_grids(files.values())
        # mistral-common is CPU work: keep the event loop free for other streams.
        return await asyncio.to_thread(self.builder.build, chat.messages, files, ref_grids)

    async def _resolve(self, sources: list[ImageSource], give_up: float | None) -> dict[str, ImageFile]:
        """Each image part's bytes and hash by field; http(s) URLs are fetched here, all at once."""
        fetched = await asyncio.gather(*(self._fetch(source, give_up) for source in sources))
        return {source.field: resolve_image(source, self.config.max_image_bytes) for source in fetched}

    async def _fetch(self, source: ImageSource, give_up: float | None) -> ImageSource:
        if source.url is None or not is_http_url(source.url):
            return source
        if self.fetcher is None:
            raise InvalidRequest(f"{source.field}.url: http(s) image URLs are not enabled on this gateway; send "
                                 "the bytes or a data: URL")
        try:
            data = await self.fetcher.fetch(source.url, _remaining(give_up))
        except ImageUrlError as error:
            raise InvalidRequest(f"{source.field}.url: {error}") from None
        return replace(source, url=None, data=data)

    async def _reference_grids(self, files) -> dict[str, tuple[int, int]]:
        """The patch grid of each image sent by reference, from its cached embedding's header."""
        ref_grids = {}
        for file in files:
            if file.data is None and file.sha256 not in ref_grids:
                header = await self.pool.probe(file.sha256)
                if header is None:
                    raise ImageNotCached(f"{file.field}.sha256: image {file.sha256} is not cached; send its bytes",
                                         file.sha256)
                ref_grids[file.sha256] = (header.grid_height, header.grid_width)
        return ref_grids

    # -- images ahead of time -----------------------------------------------------------------------------------

    async def put_images(self, sources: list[ImageSource], request_id: str,
                         timeout_s: float | None) -> list[StoredImage]:
        """Validates the images like Chat does and has the missing ones encoded; one StoredImage per source."""
        give_up = _give_up(timeout_s)
        if not sources:
            raise InvalidRequest("images: at least one image is needed")
        if len(sources) > self.config.max_images:
            raise InvalidRequest(f"images: at most {self.config.max_images} images, got {len(sources)}")
        files = await self._resolve(sources, give_up)
        ref_grids = await self._reference_grids(files.values())
        images = await asyncio.to_thread(
            lambda: [self.builder.describe(file, ref_grids) for file in files.values()])
        ensured = await self._ensure_images(images, request_id, give_up)
        return [StoredImage(image, image.sha256 not in ensured.encoded) for image in images]

    def _max_tokens(self, prompt: Prompt, sampling: Sampling) -> int:
        room = self.max_model_len - len(prompt.token_ids)
        if sampling.max_tokens is None:
            if room <= 0:
                raise InvalidRequest(f"messages: the prompt has {len(prompt.token_ids)} tokens, the context "
                                     f"length is {self.max_model_len}")
            return min(self.config.default_max_tokens, room)
        if sampling.max_tokens > room:
            raise InvalidRequest(f"sampling.max_tokens: prompt ({len(prompt.token_ids)} tokens) + max_tokens "
                                 f"({sampling.max_tokens}) exceeds the context length of {self.max_model_len}")
        return sampling.max_tokens

    # -- generation ---------------------------------------------------------------------------------------------

    async def chat(self, chat: ChatInput, timeout_s: float | None) -> AsyncIterator[ChatDelta]:
        """Streams text deltas; the last delta carries finish_reason and usage."""
        metrics.IN_FLIGHT.inc()
        try:
            # Each stream read here is closed on the way out (aclosing), not when it is garbage-collected: the
            # innermost one holds the call to the decoder, whose slot must be freed when our caller goes away.
            async with aclosing(self._chat(chat, timeout_s)) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            metrics.IN_FLIGHT.dec()

    async def _chat(self, chat: ChatInput, timeout_s: float | None) -> AsyncIterator[ChatDelta]:
        started = time.monotonic()
        give_up = _give_up(timeout_s)
        sampling = validate_sampling(chat.sampling, self.config.max_stop_strings)
        prompt = await self.prompt(chat, timeout_s)
        request = DecodeRequest(
            request_id=chat.request_id, token_ids=prompt.token_ids,
            images=[(image.sha256, image.grid_height, image.grid_width) for image in prompt.images],
            max_tokens=self._max_tokens(prompt, sampling), temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, seed=sampling.seed)
        ensured = await self._ensure_images(prompt.images, chat.request_id, give_up)
        log.info("prompt of %d tokens with %d images (%d encoded); up to %d new tokens", len(prompt.token_ids),
                 len(prompt.images), ensured.num_encoded, request.max_tokens)
        detokenizer = IncrementalDetokenizer(self.builder.tokenizer)
        stops = StopMatcher(sampling.stop)
        num_completion, finish_reason, last_token_at = 0, None, None

        def count_reencoded(again: EnsureResult) -> None:
            nonlocal ensured   # images found in the cache first and then encoded again count as encoded
            ensured = EnsureResult(ensured.num_cached - again.num_encoded, ensured.num_encoded + again.num_encoded)

        try:
            async with aclosing(self._decode(request, prompt, give_up, count_reencoded)) as outputs:
                async for output in outputs:
                    now = time.monotonic()
                    if output.token_ids:
                        if last_token_at is None:
                            metrics.TIME_TO_FIRST_TOKEN.observe(now - started)
                        else:
                            metrics.TIME_PER_OUTPUT_TOKEN.observe((now - last_token_at) / len(output.token_ids))
                        last_token_at = now
                        metrics.GENERATED_TOKENS.inc(len(output.token_ids))
                    num_completion += len(output.token_ids)
                    text, is_stopped = stops.feed(detokenizer.add(output.token_ids))
                    if is_stopped:
                        finish_reason = "stop"
                    elif output.finish_reason is not None:
                        finish_reason = output.finish_reason
                        text += stops.feed(detokenizer.flush())[0] + stops.flush()
                    if text or output.token_ids:
                        yield ChatDelta(text, output.token_ids)
                    if finish_reason is not None:
                        break  # leaving the decoder stream cancels it, which frees its slot at once
        except ServiceError:
            if num_completion:
                yield ChatDelta("", [], "error", self._usage(prompt, num_completion, ensured))
            raise
        yield ChatDelta("", [], finish_reason or "error", self._usage(prompt, num_completion, ensured))

    async def _ensure_images(self, images: list[PromptImage], request_id: str,
                             give_up: float | None) -> EnsureResult:
        timeout = self.config.encode_timeout_s
        if give_up is not None:
            timeout = min(timeout, give_up - time.monotonic())
            if timeout <= 0:
                raise DeadlineExceeded("deadline exceeded before the images were encoded")
        return await self.pool.ensure(images, request_id, timeout)

    async def _decode(self, request: DecodeRequest, prompt: Prompt, give_up: float | None,
                      on_reencoded: Callable[[EnsureResult], None]) -> AsyncIterator[DecodeOutput]:
        """The decoder's outputs; if it finds an embedding gone (evicted, corrupt), re-encode once and retry."""
        for attempt in range(2):
            timeout = None if give_up is None else max(0.0, give_up - time.monotonic())
            try:
                async with aclosing(self.decoders.generate(request, timeout)) as outputs:
                    async for output in outputs:
                        yield output
                return
            except ImageNotCached as error:
                if attempt or not error.sha256:
                    raise
                log.warning("decoder found no valid embedding of %s: re-encoding", error.sha256)
                await self.pool.invalidate(error.sha256)
                on_reencoded(await self._ensure_images(prompt.images, request.request_id, give_up))

    @staticmethod
    def _usage(prompt: Prompt, num_completion: int, ensured: EnsureResult) -> Usage:
        metrics.IMAGES.labels("cache").inc(ensured.num_cached)
        metrics.IMAGES.labels("encoded").inc(ensured.num_encoded)
        return Usage(prompt_tokens=len(prompt.token_ids), completion_tokens=num_completion,
                     image_tokens=prompt.num_image_tokens, cached_images=ensured.num_cached,
                     encoded_images=ensured.num_encoded)
