"""The chat service's ChatDeltas -> OpenAI's `chat.completion` (the whole answer) and `chat.completion.chunk`
objects (one per delta, for server-sent events), with vLLM's additions (`stop_reason`; `token_ids` when asked).

Usage carries OpenAI's keys (`prompt_tokens_details`: `cached_tokens`, the prompt tokens whose KV came from the
decoder's prefix cache; `image_tokens`; `text_tokens`) and ours beside them: `cached_images`, `encoded_images`.

A completion that ends `cancelled` or `error` is no choice: the chat failed, and the caller gets an error instead
(`failure`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

from services.gateway.chat import ChatDelta, Usage
from services.gateway.completion import TokenLogprob, ToolCallOutput
from shared.errors import Unavailable

FAILED = ("cancelled", "error")
# OpenAI's stand-in for the log-probability of a token that cannot be sampled (JSON has no -Infinity).
MIN_LOGPROB = -9999.0


class TokenPieces:
    """Token id -> its bytes, for OpenAI's logprobs (`token` and `bytes`)."""

    def __init__(self, tokenizer) -> None:
        self._raw = tokenizer.instruct_tokenizer.tokenizer   # Tekkenizer: byte pieces per id

    def piece(self, token_id: int) -> bytes:
        return self._raw.id_to_byte_piece(token_id, SpecialTokenPolicy.KEEP)

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        piece = self.piece(token_id)
        return {"token": piece.decode("utf-8", errors="replace"),
                "logprob": logprob if math.isfinite(logprob) else MIN_LOGPROB, "bytes": list(piece)}


def usage_json(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens, "image_tokens": usage.image_tokens,
                                      "text_tokens": usage.prompt_tokens - usage.image_tokens},
            "cached_images": usage.cached_images, "encoded_images": usage.encoded_images}


def tool_call_json(call: ToolCallOutput) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


@dataclass
class _Choice:
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCallOutput] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class Rendering:
    """One request's answer in OpenAI's objects: `chunk(delta)` for each delta of a stream, or `add(delta)` for
    each and `completion()` at the end. `failure` is set by a delta that ends a completion cancelled or in error."""

    def __init__(self, request_id: str, model: str, pieces: TokenPieces, *, is_logprobs: bool,
                 is_token_ids: bool, is_usage_in_chunks: bool) -> None:
        self.id = f"chatcmpl-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.pieces = pieces
        self.is_logprobs = is_logprobs
        self.is_token_ids = is_token_ids
        self.is_usage_in_chunks = is_usage_in_chunks   # stream_options.include_usage
        self.usage: Usage | None = None
        self.failure: str | None = None
        self._choices: dict[int, _Choice] = {}
        self._num_tool_calls: dict[int, int] = {}       # streamed so far, per choice

    def _logprobs(self, entries) -> dict[str, Any] | None:
        if not self.is_logprobs:
            return None
        return {"content": [self.pieces.entry(entry.token_id, entry.logprob) | {
            "top_logprobs": [self.pieces.entry(top.token_id, top.logprob) for top in entry.top]}
            for entry in entries], "refusal": None}

    def _track(self, delta: ChatDelta) -> None:
        if delta.usage is not None:
            self.usage = delta.usage
        if delta.finish_reason in FAILED:
            self.failure = delta.finish_reason

    def failure_error(self) -> Unavailable:
        return Unavailable("the generation was cancelled" if self.failure == "cancelled"
                           else "the generation failed")

    # -- a stream -----------------------------------------------------------------------------------------------

    def _object(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": choices}
        if self.is_usage_in_chunks:
            chunk["usage"] = None
        return chunk

    def chunk(self, delta: ChatDelta) -> dict[str, Any] | None:
        """The chunk of one delta; None when it has nothing to say."""
        self._track(delta)
        if delta.finish_reason in FAILED:
            return None
        is_first = delta.index not in self._num_tool_calls
        message: dict[str, Any] = {}
        if is_first:
            self._num_tool_calls[delta.index] = 0
            message["role"] = "assistant"
        if delta.text or is_first:
            message["content"] = delta.text
        if delta.tool_calls:
            first_call = self._num_tool_calls[delta.index]
            message["tool_calls"] = [{"index": first_call + k} | tool_call_json(call)
                                     for k, call in enumerate(delta.tool_calls)]
            self._num_tool_calls[delta.index] += len(delta.tool_calls)
        if not message and delta.finish_reason is None and not (delta.token_ids and (
                self.is_logprobs or self.is_token_ids)):
            return None
        choice = {"index": delta.index, "delta": message,
                  "logprobs": self._logprobs(delta.logprobs) if delta.token_ids else None,
                  "finish_reason": delta.finish_reason}
        if delta.finish_reason is not None:
            choice["stop_reason"] = delta.stop_reason
        if self.is_token_ids:
            choice["token_ids"] = delta.token_ids
        return self._object([choice])

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk with stream_options.include_usage: no choices, the usage of the whole request."""
        chunk = self._object([])
        chunk["usage"] = usage_json(self.usage) if self.usage is not None else None
        return chunk

    # -- the whole answer ---------------------------------------------------------------------------------------

    def add(self, delta: ChatDelta) -> None:
        self._track(delta)
        choice = self._choices.setdefault(delta.index, _Choice())
        choice.texts.append(delta.text)
        choice.token_ids += delta.token_ids
        choice.logprobs += delta.logprobs
        choice.tool_calls += delta.tool_calls
        if delta.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason

    def completion(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self._choices):
            choice = self._choices[index]
            text = "".join(choice.texts)
            message: dict[str, Any] = {"role": "assistant",
                                       "content": None if choice.tool_calls and not text else text}
            if choice.tool_calls:
                message["tool_calls"] = [tool_call_json(call) for call in choice.tool_calls]
            rendered = {"index": index, "message": message, "logprobs": self._logprobs(choice.logprobs),
                        "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}
            if self.is_token_ids:
                rendered["token_ids"] = choice.token_ids
            choices.append(rendered)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage_json(self.usage) if self.usage is not None else None}
