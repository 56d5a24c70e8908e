"""Which decoder takes a request: the routing policy, pure logic over what the gateway knows of each decoder.

Each decoder keeps a prefix cache: a prompt that starts like one it computed before (the same image asked about
again, the same system prompt, the earlier turns of a chat) skips that part of its prefill, but only on the decoder
that computed it. `Affinity` sends the prompts that start alike to the same decoder:

- the key is the first image's sha256 (the embedding cache's key), or for a prompt without images a hash of its
  first `num_prefix_tokens` token ids;
- the decoder is chosen by rendezvous hashing (highest random weight): each healthy decoder scores
  hash(key, address) and the highest score wins. Every gateway computes the same choice with no shared state, and a
  decoder that joins or leaves moves only the keys it wins or won;
- with a load bound (consistent hashing with bounded loads): a decoder takes a request only while its load stays
  within ceil(load_factor x the average load, this request included) or within `load_slack` requests of the least
  loaded decoder, and never while it is full (at its admission capacity, or with sequences waiting for KV memory).
  The slack is there because a few more streams cost a decoder's step little (continuous batching) while a
  repeated image's prefill sent elsewhere costs it all again: a handful of callers over a few decoders would
  otherwise overflow the factor's bound all the time. A request its decoder cannot take goes to the next
  decoder in the key's own order (its second choice, the same for every request of that key), so a hot image
  spills over to one more decoder rather than to all of them; when every decoder is full, the least loaded.

`LeastBusy` is the policy without affinity: the fewest requests in flight, ties in turn.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from shared.generation import DecoderInfo, GenerateRequest

POLICIES = ("affinity", "least-busy")
NUM_PREFIX_TOKENS = 64   # a text prompt's key: its first tokens (BOS, [INST], the start of the first message)
DEFAULT_LOAD_FACTOR = 1.25
DEFAULT_LOAD_SLACK = 32   # requests


@dataclass(frozen=True, slots=True)
class DecoderLoad:
    """What the gateway knows of one decoder when it routes a request."""

    address: str
    is_healthy: bool
    num_outstanding: int      # this gateway's requests on it now: exact and immediate
    num_elsewhere: int = 0    # requests of other gateways on it, at its last Info
    info: DecoderInfo | None = None   # its last Info (limits and state), None while unknown

    @property
    def load(self) -> int:
        return self.num_outstanding + self.num_elsewhere

    @property
    def is_at_capacity(self) -> bool:
        """It would refuse a request now (RESOURCE_EXHAUSTED); False while its limits are unknown."""
        return self.info is not None and self.load >= self.info.capacity

    @property
    def is_full(self) -> bool:
        """It would refuse or queue a request: at its admission capacity, or sequences waiting for KV memory."""
        info = self.info
        if info is None:
            return False
        return self.load >= info.capacity or (info.num_waiting > 0 and info.num_free_blocks == 0)


@dataclass(frozen=True, slots=True)
class Ranking:
    """The decoders to try for one request, first choice first (the others are tried if it fails at once)."""

    addresses: tuple[str, ...]
    reason: str   # "affinity" (the key's decoder), "spilled" (it was over the bound or full), "least_busy"


def affinity_key(request: GenerateRequest, num_prefix_tokens: int = NUM_PREFIX_TOKENS) -> bytes:
    """What identifies the prompts a decoder's prefix cache can serve together."""
    if request.images:
        return image_key(request.images[0].sha256)
    prefix = array("I", request.prompt_token_ids[:num_prefix_tokens]).tobytes()
    return b"tokens:" + hashlib.blake2b(prefix, digest_size=16).digest()


def image_key(sha256: str) -> bytes:
    return b"image:" + sha256.encode()


def score(key: bytes, address: str) -> int:
    """The rendezvous weight of `address` for `key`: a stable hash (the same in every gateway process)."""
    return int.from_bytes(hashlib.blake2b(key + b"\0" + address.encode(), digest_size=8).digest(), "big")


def _candidates(decoders: Sequence[DecoderLoad]) -> Sequence[DecoderLoad]:
    # When no decoder is healthy all are tried: health answers lag behind, and one that cannot serve fails at once.
    return [decoder for decoder in decoders if decoder.is_healthy] or decoders


class Affinity:
    def __init__(self, load_factor: float = DEFAULT_LOAD_FACTOR, load_slack: int = DEFAULT_LOAD_SLACK) -> None:
        if load_factor <= 1.0 or load_slack < 0:
            raise ValueError("the load factor must be above 1 and the load slack not negative")
        self.load_factor = load_factor
        self.load_slack = load_slack

    def rank(self, key: bytes, decoders: Sequence[DecoderLoad]) -> Ranking:
        candidates = _candidates(decoders)
        if not candidates:
            return Ranking((), "affinity")
        order = sorted(candidates, key=lambda decoder: score(key, decoder.address), reverse=True)
        total = sum(decoder.load for decoder in candidates) + 1
        bound = max(math.ceil(self.load_factor * total / len(candidates)),
                    min(decoder.load for decoder in candidates) + self.load_slack)
        chosen = next((decoder for decoder in order if not decoder.is_full and decoder.load < bound), None)
        if chosen is None:   # every one is full: the least loaded
            chosen = min(order, key=lambda decoder: decoder.load)
        rest = tuple(decoder.address for decoder in order if decoder is not chosen)
        return Ranking((chosen.address, *rest), "affinity" if chosen is order[0] else "spilled")


class LeastBusy:
    def __init__(self) -> None:
        self._turn = itertools.count()

    def rank(self, key: bytes, decoders: Sequence[DecoderLoad]) -> Ranking:
        if not decoders:
            return Ranking((), "least_busy")
        start = next(self._turn) % len(decoders)
        rotated = [*decoders[start:], *decoders[:start]]
        ranked = sorted(_candidates(rotated), key=lambda decoder: decoder.num_outstanding)
        return Ranking(tuple(decoder.address for decoder in ranked), "least_busy")


def policy(name: str, load_factor: float = DEFAULT_LOAD_FACTOR,
           load_slack: int = DEFAULT_LOAD_SLACK) -> Affinity | LeastBusy:
    if name == "affinity":
        return Affinity(load_factor, load_slack)
    if name == "least-busy":
        return LeastBusy()
    raise ValueError(f"routing must be one of {', '.join(POLICIES)}, got {name!r}")
