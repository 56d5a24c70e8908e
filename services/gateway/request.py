"""The gateway's domain view of a chat request, and validation of its sampling parameters."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from shared.errors import InvalidRequest

MAX_TOKENS_LIMIT = 1 << 20   # anything above is absurd for this model (context 128K)
MAX_STOP_LENGTH = 256        # characters per stop string


class Role(enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


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
class ChatMessage:
    role: Role | None          # None: the caller left it unspecified
    parts: list[Part]
    field: str                 # "messages[i]"


@dataclass(frozen=True, slots=True)
class SamplingInput:
    """As sent: None means unset."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ChatInput:
    request_id: str
    messages: list[ChatMessage]
    sampling: SamplingInput = field(default_factory=SamplingInput)


@dataclass(frozen=True, slots=True)
class Sampling:
    """Validated sampling; max_tokens is resolved against the context once the prompt length is known."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]


def validate_sampling(sampling: SamplingInput, max_stop_strings: int) -> Sampling:
    temperature = 1.0 if sampling.temperature is None else sampling.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest(f"sampling.temperature: must be a finite number >= 0, got {temperature}")
    top_p = 1.0 if sampling.top_p is None else sampling.top_p
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidRequest(f"sampling.top_p: must be in (0, 1], got {top_p}")
    top_k = sampling.top_k or 0
    if top_k < 0:
        raise InvalidRequest(f"sampling.top_k: must be >= 0, got {top_k}")
    if sampling.max_tokens is not None and not 0 < sampling.max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidRequest(f"sampling.max_tokens: must be in [1, {MAX_TOKENS_LIMIT}], got {sampling.max_tokens}")
    if len(sampling.stop) > max_stop_strings:
        raise InvalidRequest(f"sampling.stop: at most {max_stop_strings} strings, got {len(sampling.stop)}")
    for index, stop in enumerate(sampling.stop):
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise InvalidRequest(f"sampling.stop[{index}]: must have 1 to {MAX_STOP_LENGTH} characters")
    return Sampling(sampling.max_tokens, temperature, top_p, top_k, sampling.seed, tuple(sampling.stop))
