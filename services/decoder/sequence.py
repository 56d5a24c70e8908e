"""Per-request state of the decoder engine. Pure Python: the scheduler and block manager read nothing else."""

from __future__ import annotations

import enum
import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Any

from shared.sampling import SamplingParams


# Stands for a token that a forward pass in flight is sampling: the next step, queued before the host reads it,
# takes it from the device (model_runner.py), and the host writes it in once it arrives (Scheduler.postprocess).
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # queued, or preempted and waiting to be recomputed
    RUNNING = "running"    # holds KV blocks; prefilling in chunks or decoding
    FINISHED = "finished"  # done; its blocks are free


class FinishReason(enum.Enum):
    STOP = "stop"            # end-of-sequence token, a stop token id, or the end of the output's format
    LENGTH = "length"        # max_tokens or the context length
    CANCELLED = "cancelled"  # the caller went away or the engine shut down
    ERROR = "error"          # the forward pass failed


@dataclass(slots=True)
class Sequence:
    request_id: str
    token_ids: list[int]            # prompt followed by the generated tokens
    num_prompt_tokens: int
    sampling: SamplingParams
    max_model_len: int              # prompt + generated tokens never exceed this
    arrival: int                    # admission order: older sequences are served first, newer ones preempted first
    images: Any = None              # opaque to the scheduler: the model runner's image features for [IMG] positions
    # (first position, end position, sha256) of each image's [IMG] tokens: what the KV of a block depends on
    # besides its tokens. A sequence with images but no spans is never shared through the prefix cache.
    image_spans: tuple[tuple[int, int, str], ...] = ()
    eos_token_id: int | None = None   # None: the model's, set by the engine when the sequence is added
    # Opaque to the scheduler: the grammar matcher of the output's format (structured_output.FormatMatcher), which
    # the engine advances by each token and the runner asks for the next token's mask.
    constraint: Any = None
    choice_index: int = 0           # which of its request's completions this is
    num_cached_prompt_tokens: int = 0   # prompt tokens whose KV came from the prefix cache at its admission
    num_times_passed: int = 0       # steps in which later prompts were admitted past it (scheduler.py)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0    # tokens whose KV entries are written
    block_table: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0      # leading blocks of block_table registered in the prefix cache
    finish_reason: FinishReason | None = None
    _block_hashes: list[bytes] = field(default_factory=list, repr=False)   # see block_hashes()

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prompt_computed(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    @property
    def is_shareable(self) -> bool:
        """Whether its KV blocks can be shared through the prefix cache: the identity of every image is known."""
        return self.images is None or bool(self.image_spans)

    def block_hashes(self, block_size: int, count: int) -> list[bytes]:
        """Content hashes of its first `count` full blocks. Each covers everything before it (the previous block's
        hash), the block's token ids and the images whose [IMG] tokens it holds: equal hashes, equal KV entries.
        SHA-256, not Python's hash(): a crafted prompt must not be able to collide with another user's blocks."""
        hashes = self._block_hashes
        while len(hashes) < count:
            start = len(hashes) * block_size
            end = start + block_size
            digest = hashlib.sha256(hashes[-1] if hashes else b"")
            digest.update(array("q", self.token_ids[start:end]).tobytes())
            for first, last, sha256 in self.image_spans:
                if first < end and start < last:
                    digest.update(sha256.encode())
            hashes.append(digest.digest())
        return hashes[:count]

    def append_token(self, token_id: int) -> FinishReason | None:
        """Adds a sampled token and says whether the sequence is now finished."""
        self.token_ids.append(token_id)
        return self.finish_reason_at(len(self.token_ids) - 1)

    def fill_pending_token(self, index: int, token_id: int) -> FinishReason | None:
        """Writes the token sampled for position `index`, a PENDING_TOKEN until now; whether it finishes."""
        self.token_ids[index] = token_id
        return self.finish_reason_at(index)

    def finish_reason_at(self, index: int) -> FinishReason | None:
        """Whether the sequence ends with its token at position `index`."""
        token_id = self.token_ids[index]
        if (token_id == self.eos_token_id and not self.sampling.ignore_eos) or token_id in self.sampling.stop_token_ids:
            return FinishReason.STOP
        if self.ends_by_length_at(index):
            return FinishReason.LENGTH
        return None

    def ends_by_length_at(self, index: int) -> bool:
        """Whether a token at position `index` is the last one max_tokens and the context length allow."""
        return index + 1 - self.num_prompt_tokens >= self.sampling.max_tokens or index + 1 >= self.max_model_len

    def reset_for_recompute(self) -> None:
        """After preemption its KV entries are gone: the prompt and the tokens so far are prefilled again."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_cached_blocks = 0
        self.status = SequenceStatus.WAITING
