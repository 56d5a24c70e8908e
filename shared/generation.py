"""What the gateway asks a decoder for and what a decoder says about itself: the domain form of the internal API
(the transport converts it from and to protos: services/gateway/decoder_messages.py, services/decoder/server.py)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.sampling import SamplingParams
from shared.structured_output import ResponseFormat


@dataclass(frozen=True, slots=True)
class ImageRef:
    """Where to find the embedding of one image of a prompt: the cache key's image hash and its patch grid."""

    sha256: str
    grid_height: int    # patch rows: the image has grid_height * grid_width [IMG] tokens and embedding rows
    grid_width: int

    @property
    def num_rows(self) -> int:
        return self.grid_height * self.grid_width


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    images: list[ImageRef]     # in the order of their [IMG] runs in the prompt
    sampling: SamplingParams
    n: int = 1                 # completions, sharing the prompt's KV blocks
    seeds: tuple[int, ...] = ()   # one per completion; empty: sampling.seed for each
    format: ResponseFormat | None = None   # what the output must be (a grammar masks every token)


@dataclass(frozen=True, slots=True)
class Logprobs:
    """A generated token's log-probability under the model's distribution, and the most likely alternatives."""

    token_id: int
    logprob: float
    top_token_ids: tuple[int, ...] = ()   # most likely first
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class DecoderInfo:
    """A decoder's model, limits and load (its Info RPC)."""

    max_model_len: int       # prompt + generated tokens at most: trained context capped by the KV cache
    vocab_size: int
    block_size: int
    model_fingerprint: str   # of the model whose image features it reads
    prefix_caching: bool
    max_num_seqs: int
    max_queued: int
    num_unfinished: int      # admitted and not finished, now
    num_blocks: int
    num_free_blocks: int
    num_running: int = 0                # sequences holding KV blocks, now
    num_waiting: int = 0                # sequences waiting for a slot or KV blocks, now
    num_prefix_cached_blocks: int = 0   # KV blocks registered in the prefix cache (in use or kept for reuse)
    num_prefix_queried_tokens: int = 0  # prompt tokens of the sequences admitted so far
    num_prefix_hit_tokens: int = 0      # of those, tokens whose KV came from the prefix cache

    @property
    def capacity(self) -> int:
        """Requests it admits at once before it refuses with RESOURCE_EXHAUSTED."""
        return self.max_num_seqs + self.max_queued
