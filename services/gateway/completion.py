"""One completion's text as its tokens come from the decoder: decoded incrementally (a multi-byte character split
across tokens comes out whole), or read for tool calls where the request has tools, stop strings applied, the
logprobs' alternatives given their text, and what ended it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from services.gateway.decoder_messages import DecodeOutput
from services.gateway.detokenizer import IncrementalDetokenizer, StopMatcher
from shared.generation import Logprobs
from shared.tool_call_parser import ToolCallParser


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    logprob: float
    text: str


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()   # the most likely tokens at its position, most likely first
    text: str = ""                     # the token's own text


@dataclass(frozen=True, slots=True)
class ToolCallOutput:
    id: str
    name: str
    arguments: str   # a JSON object, as text


@dataclass(frozen=True, slots=True)
class CompletionDelta:
    """What one decoder output adds to a completion."""

    text: str
    token_ids: list[int]
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCallOutput, ...] = ()


@dataclass(slots=True)
class Completion:
    index: int
    seed: int
    stops: StopMatcher
    detokenizer: IncrementalDetokenizer
    parser: ToolCallParser | None          # where the output is read for [TOOL_CALLS]
    tokenizer: MistralTokenizer
    num_tokens: int = 0
    last_token_id: int | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None   # the stop string, or the token id that ended it
    num_tool_calls: int = 0
    cached_prompt_tokens: int = 0
    _pieces: dict[int, str] = field(default_factory=dict)

    @staticmethod
    def start(index: int, seed: int, tokenizer: MistralTokenizer, stops: tuple[str, ...],
              parses_tool_calls: bool) -> Completion:
        return Completion(index, seed, StopMatcher(stops), IncrementalDetokenizer(tokenizer),
                          ToolCallParser(tokenizer) if parses_tool_calls else None, tokenizer)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, output: DecodeOutput) -> CompletionDelta:
        """The text, calls and logprobs of the output's tokens; sets finish_reason once the completion ends."""
        self.num_tokens += len(output.token_ids)
        if output.token_ids:
            self.last_token_id = output.token_ids[-1]
        text, calls = self._read(output.token_ids)
        text, is_stopped = self.stops.feed(text)
        is_last = is_stopped or output.finish_reason is not None
        if not is_stopped and is_last:
            rest, more = self._read_rest()
            text += self.stops.feed(rest)[0] + self.stops.flush()
            calls += more
        self.num_tool_calls += len(calls)
        if is_last:
            self._finish("stop" if is_stopped else output.finish_reason, output.cached_prompt_tokens)
        return CompletionDelta(text, list(output.token_ids), self._logprobs(output.logprobs), tuple(
            ToolCallOutput(call.id, call.name, json.dumps(call.arguments, ensure_ascii=False)) for call in calls))

    def _read(self, token_ids: list[int]) -> tuple[str, list]:
        if self.parser is None:
            return self.detokenizer.add(token_ids), []
        delta = self.parser.feed(token_ids)
        return delta.content, list(delta.tool_calls)

    def _read_rest(self) -> tuple[str, list]:
        """What the end of the output leaves: an incomplete character (as U+FFFD); after [TOOL_CALLS], the calls
        completed last and, as text, what made no complete call (output cut by max_tokens, or malformed)."""
        if self.parser is None:
            return self.detokenizer.flush(), []
        last = self.parser.finish()
        return last.content + last.unparsed, list(last.tool_calls)

    def _finish(self, reason: str, cached_prompt_tokens: int) -> None:
        self.cached_prompt_tokens = cached_prompt_tokens
        self.finish_reason = reason
        if reason == "stop":
            self.stop_reason = self.stops.matched if self.stops.matched is not None else self.last_token_id
            if self.num_tool_calls:
                self.finish_reason = "tool_calls"

    def _logprobs(self, entries: tuple[Logprobs, ...]) -> tuple[TokenLogprob, ...]:
        return tuple(TokenLogprob(entry.token_id, entry.logprob, tuple(
            TopLogprob(token_id, logprob, self._piece(token_id))
            for token_id, logprob in zip(entry.top_token_ids, entry.top_logprobs)), self._piece(entry.token_id))
            for entry in entries)

    def _piece(self, token_id: int) -> str:
        """A token's own text (an incomplete UTF-8 character as U+FFFD)."""
        text = self._pieces.get(token_id)
        if text is None:
            raw = self.tokenizer.instruct_tokenizer.tokenizer
            text = raw.id_to_byte_piece(token_id, SpecialTokenPolicy.KEEP).decode("utf-8", errors="replace")
            self._pieces[token_id] = text
        return text

