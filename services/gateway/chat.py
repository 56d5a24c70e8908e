"""The gateway's chat: the request's route to a decoder (route.py), then the decoder's tokens streamed back as text
(UTF-8 safe, stop strings applied), usage at the end; and what the gateway says of its model (GetModelInfo)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

from services.gateway import metrics
from services.gateway.completion import Completion, TokenLogprob, ToolCallOutput
from services.gateway.decoder_messages import DecodeOutput
from services.gateway.prompt import PATCH_SIZE, Prompt
from services.gateway.request import ChatInput, validate_sampling
from services.gateway.route import Route, give_up_at, remaining
from shared.errors import ImageNotCached, ServiceError
from shared.generation import GenerateRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int      # of every completion (n > 1)
    image_tokens: int
    cached_images: int
    encoded_images: int
    cached_prompt_tokens: int = 0   # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True, slots=True)
class ChatDelta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # on a completion's last delta: stop, length, tool_calls, cancelled, error
    usage: Usage | None = None         # on the stream's last delta: of the whole request
    index: int = 0                     # the completion (0 to n - 1)
    logprobs: tuple[TokenLogprob, ...] = ()      # one per token of token_ids, when asked
    tool_calls: tuple[ToolCallOutput, ...] = ()  # calls completed by this delta
    seed: int | None = None            # on a completion's last delta: the seed it was sampled with
    stop_reason: str | int | None = None   # on a completion's last delta: the stop string or token id that ended it


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model: str
    context_length: int
    default_max_tokens: int
    max_images: int
    max_image_bytes: int
    max_image_pixels: int
    max_image_side: int
    patch_size: int
    prefix_caching: bool
    num_decoders: int
    model_fingerprint: str


class ChatService:
    def __init__(self, route: Route, model_name: str, fingerprint: str) -> None:
        self.route = route
        self.model_name = model_name
        self.fingerprint = fingerprint

    def model_info(self) -> ModelInfo:
        route, config = self.route, self.route.config
        infos = route.decoders.infos()
        return ModelInfo(
            model=self.model_name, context_length=route.context_length, default_max_tokens=config.default_max_tokens,
            max_images=config.max_images, max_image_bytes=config.max_image_bytes,
            max_image_pixels=config.max_image_pixels, max_image_side=route.builder.max_image_side,
            patch_size=PATCH_SIZE, prefix_caching=bool(infos) and all(info.prefix_caching for info in infos),
            num_decoders=len(infos), model_fingerprint=self.fingerprint)

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
        give_up = give_up_at(timeout_s)
        sampling = validate_sampling(chat.sampling, self.route.config.max_stop_strings)
        prepared = await self.route.prepare(chat, sampling, give_up)
        prompt, request = prepared.prompt, prepared.request
        encoded = prepared.encoded
        log.info("prompt of %d tokens with %d images (%d encoded); %d completions of up to %d new tokens",
                 len(prompt.token_ids), len(prompt.images), len(encoded), request.n, request.sampling.max_tokens)
        seeds = request.seeds or (request.sampling.seed,)
        completions = [Completion.start(index, seed, self.route.builder.tokenizer, sampling.stop,
                                        prepared.output.parses_tool_calls) for index, seed in enumerate(seeds)]
        last_token_at = None

        def count_reencoded(again: frozenset[str]) -> None:
            nonlocal encoded   # images found in the cache first and then encoded again count as encoded
            encoded = encoded | again

        def usage() -> Usage:
            return self._usage(prompt, sum(c.num_tokens for c in completions), encoded,
                               completions[0].cached_prompt_tokens)

        try:
            async with aclosing(self._decode(request, prompt, give_up, count_reencoded)) as outputs:
                async for output in outputs:
                    completion = completions[output.index]
                    if completion.is_finished:
                        continue   # ended by a stop string: the decoder's further tokens of it are dropped
                    if output.token_ids:
                        now = time.monotonic()
                        if last_token_at is None:
                            metrics.TIME_TO_FIRST_TOKEN.observe(now - started)
                        else:
                            metrics.TIME_PER_OUTPUT_TOKEN.observe((now - last_token_at) / len(output.token_ids))
                        last_token_at = now
                        metrics.GENERATED_TOKENS.inc(len(output.token_ids))
                    delta = completion.feed(output)
                    if delta.text or delta.token_ids or delta.tool_calls:
                        yield ChatDelta(delta.text, delta.token_ids, index=completion.index, logprobs=delta.logprobs,
                                        tool_calls=delta.tool_calls)
                    if completion.is_finished:
                        is_last = all(c.is_finished for c in completions)
                        yield _last_delta(completion, usage() if is_last else None)
                        if is_last:
                            return   # leaving the decoder stream cancels it, which frees its slot at once
        except ServiceError:
            unfinished = [c for c in completions if not c.is_finished]
            if any(c.num_tokens for c in completions):
                for completion in unfinished:
                    completion.finish_reason = "error"
                    yield _last_delta(completion, usage() if completion is unfinished[-1] else None)
            raise
        for completion in completions:   # the decoder's stream ended without their last messages
            if not completion.is_finished:
                completion.finish_reason = "error"
                yield _last_delta(completion, usage() if all(c.is_finished for c in completions) else None)

    async def _decode(self, request: GenerateRequest, prompt: Prompt, give_up: float | None,
                      on_reencoded: Callable[[frozenset[str]], None]) -> AsyncIterator[DecodeOutput]:
        """The decoder's outputs; if it finds an embedding gone (evicted, corrupt), re-encode once and retry."""
        for attempt in range(2):
            try:
                async with aclosing(self.route.decoders.generate(request, remaining(give_up))) as outputs:
                    async for output in outputs:
                        yield output
                return
            except ImageNotCached as error:
                if attempt or not error.sha256:
                    raise
                log.warning("decoder found no valid embedding of %s: re-encoding", error.sha256)
                await self.route.pool.invalidate(error.sha256)
                on_reencoded(await self.route.encode(await self.route.gone(prompt), request.request_id, give_up))

    @staticmethod
    def _usage(prompt: Prompt, num_completion: int, encoded: frozenset[str], cached_prompt_tokens: int) -> Usage:
        num_encoded = len({image.sha256 for image in prompt.images} & encoded)
        num_cached = len(prompt.images) - num_encoded
        metrics.IMAGES.labels("cache").inc(num_cached)
        metrics.IMAGES.labels("encoded").inc(num_encoded)
        return Usage(prompt_tokens=len(prompt.token_ids), completion_tokens=num_completion,
                     image_tokens=prompt.num_image_tokens, cached_images=num_cached, encoded_images=num_encoded,
                     cached_prompt_tokens=cached_prompt_tokens)


def _last_delta(completion: Completion, usage: Usage | None) -> ChatDelta:
    """A completion's last message: why it ended, its seed; the stream's last one also carries the usage."""
    return ChatDelta("", [], completion.finish_reason, usage, index=completion.index, seed=completion.seed,
                     stop_reason=completion.stop_reason)
