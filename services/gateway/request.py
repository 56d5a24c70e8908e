"""The gateway's domain view of a chat request (both transports, gRPC and HTTP, build it), and validation of its
sampling parameters."""

from __future__ import annotations

import enum
import math
import secrets
import uuid
from dataclasses import dataclass, field, replace

from shared.errors import InvalidRequest
from shared.logs import is_metadata_safe
from shared.sampling import MAX_TOP_LOGPROBS, SamplingParams

MAX_TOKENS_LIMIT = 1 << 20   # anything above is absurd for this model (context 128K)
MAX_STOP_LENGTH = 256        # characters per stop string
MAX_REQUEST_ID_LENGTH = 128   # a caller's id goes back in every error's metadata and into every role's log lines


class Role(enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class ImageSource:
    """An image as the caller gave it: exactly one of data, url, sha256 is set."""

    field: str                # where it sits in the request, e.g. "messages[0].content[1].image"
    data: bytes | None = None
    url: str | None = None
    sha256: str | None = None


Part = TextPart | ImageSource


@dataclass(frozen=True, slots=True)
class ToolCallInput:
    """A tool call of an assistant message in the history."""

    id: str
    name: str
    arguments: str        # a JSON object, as text
    field: str            # e.g. "messages[2].tool_calls[0]"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role | None          # None: the caller left it unspecified
    parts: list[Part]
    field: str                 # "messages[i]"
    tool_calls: tuple[ToolCallInput, ...] = ()   # assistant: the calls it made
    tool_call_id: str = ""                       # tool: the call it answers
    prefix: bool = False                         # assistant, last: the start of the answer, to continue


@dataclass(frozen=True, slots=True)
class ToolInput:
    """A function the model may call."""

    name: str
    description: str
    parameters: str       # its arguments' JSON schema, as text; "" for none
    field: str            # e.g. "tools[1]"


@dataclass(frozen=True, slots=True)
class FormatInput:
    """The output's format as sent: kind json_object, json_schema, regex, choice or grammar."""

    kind: str
    spec: str | tuple[str, ...]   # the schema, regex or grammar text; the strings of a choice; "" for json_object


@dataclass(frozen=True, slots=True)
class SamplingInput:
    """As sent: None means unset."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_p: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class ChatInput:
    request_id: str
    messages: list[ChatMessage]
    sampling: SamplingInput = field(default_factory=SamplingInput)
    n: int | None = None                          # completions; None: 1
    response_format: FormatInput | None = None
    tools: tuple[ToolInput, ...] = ()
    tool_choice: str | None = None                # "auto", "none", "required", or the one function's name
    tool_choice_is_function: bool = False         # tool_choice names a function
    parallel_tool_calls: bool | None = None       # None: True


@dataclass(frozen=True, slots=True)
class Sampling:
    """Validated sampling: `params` is complete but for max_tokens (the requested one, 0 if unset), which is
    resolved against the context once the prompt's length is known (`resolved`)."""

    params: SamplingParams
    requested_max_tokens: int | None
    stop: tuple[str, ...]

    def resolved(self, max_tokens: int) -> SamplingParams:
        return replace(self.params, max_tokens=max_tokens)


MAX_LOGIT_BIASES = 1024
MAX_STOP_TOKEN_IDS = 64
VOCAB_SIZE = 131072    # Tekken's: ids at or above it name no token


def _in_range(field: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidRequest(field, f"must be in [{low:g}, {high:g}], got {value}")


def _token_ids(field: str, token_ids) -> None:
    for token_id in token_ids:
        if not 0 <= token_id < VOCAB_SIZE:
            raise InvalidRequest(field, f"token id {token_id} outside the vocabulary of {VOCAB_SIZE}")


def request_id_or_new(request_id: str, field: str = "request_id") -> str:
    """The caller's id when it is safe to echo back, a new one when the caller gave none."""
    if not request_id:
        return uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidRequest(field, f"at most {MAX_REQUEST_ID_LENGTH} characters, got {len(request_id)}")
    if not is_metadata_safe(request_id):
        raise InvalidRequest(field, "printable ASCII characters only (no control characters, no non-ASCII)")
    return request_id


def validate_sampling(sampling: SamplingInput, max_stop_strings: int) -> Sampling:
    """The API's defaults applied (temperature 1.0, a random seed when none is given) and every value checked."""
    temperature = 1.0 if sampling.temperature is None else sampling.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest("sampling.temperature", f"must be a finite number >= 0, got {temperature}")
    top_p = 1.0 if sampling.top_p is None else sampling.top_p
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {top_p}")
    top_k = sampling.top_k or 0
    if top_k < 0:
        raise InvalidRequest("sampling.top_k", f"must be >= 0, got {top_k}")
    if sampling.max_tokens is not None and not 0 < sampling.max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidRequest("sampling.max_tokens", f"must be in [1, {MAX_TOKENS_LIMIT}], got {sampling.max_tokens}")
    if len(sampling.stop) > max_stop_strings:
        raise InvalidRequest("sampling.stop", f"at most {max_stop_strings} strings, got {len(sampling.stop)}")
    for index, stop in enumerate(sampling.stop):
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise InvalidRequest(f"sampling.stop[{index}]", f"must have 1 to {MAX_STOP_LENGTH} characters")
    repetition_penalty = 1.0 if sampling.repetition_penalty is None else sampling.repetition_penalty
    if not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise InvalidRequest("sampling.repetition_penalty", f"must be a finite number > 0, got {repetition_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
        _in_range(f"sampling.{name}", getattr(sampling, name) or 0.0, -2.0, 2.0)
    _in_range("sampling.min_p", sampling.min_p or 0.0, 0.0, 1.0)
    if len(sampling.logit_bias) > MAX_LOGIT_BIASES:
        raise InvalidRequest("sampling.logit_bias", f"at most {MAX_LOGIT_BIASES} entries, got "
                             f"{len(sampling.logit_bias)}")
    _token_ids("sampling.logit_bias", (token_id for token_id, _ in sampling.logit_bias))
    for token_id, bias in sampling.logit_bias:
        _in_range(f"sampling.logit_bias[{token_id}]", bias, -100.0, 100.0)
    min_tokens = sampling.min_tokens or 0
    if min_tokens < 0 or (sampling.max_tokens is not None and min_tokens > sampling.max_tokens):
        raise InvalidRequest("sampling.min_tokens", f"must be in [0, max_tokens], got {min_tokens}")
    if len(sampling.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest("sampling.stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got "
                             f"{len(sampling.stop_token_ids)}")
    _token_ids("sampling.stop_token_ids", sampling.stop_token_ids)
    top_logprobs = sampling.top_logprobs or 0
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest("sampling.top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
    seed = secrets.randbits(63) if sampling.seed is None else sampling.seed
    params = SamplingParams(
        max_tokens=sampling.max_tokens or 0, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        min_p=sampling.min_p or 0.0, repetition_penalty=repetition_penalty,
        presence_penalty=sampling.presence_penalty or 0.0, frequency_penalty=sampling.frequency_penalty or 0.0,
        logit_bias=tuple(sorted(sampling.logit_bias)), min_tokens=min_tokens,
        stop_token_ids=tuple(dict.fromkeys(sampling.stop_token_ids)), ignore_eos=bool(sampling.ignore_eos),
        # top alternatives come with the chosen token's own logprob
        logprobs=bool(sampling.logprobs) or top_logprobs > 0, top_logprobs=top_logprobs)
    return Sampling(params, sampling.max_tokens, tuple(sampling.stop))
