"""Continuous batching: which sequences run in the next forward pass, and how many of their tokens.

Pure Python (no torch), unit tested on its own. Every step has a token budget shared by all sequences:
decoding sequences take one token each, whatever their place in the order, and prompts are prefilled in chunks of
what is left, so a long image prompt never stalls the streams that are decoding. A step that carries decoding
streams prefills at most `max_prefill_tokens_while_decoding` tokens where that is set (the engine keeps it within a
time budget by the steps it runs, step_budget.py), to bound their time per output token while prompts wait.

Older sequences come first; when KV blocks run out, the newest running sequence is preempted (its blocks freed) and
recomputed later. Head-of-line blocking by long prompts is bounded two ways: a prompt's chunk is at most half of the
step's prefill budget while other prompts wait behind it, and a waiting prompt too large for the free KV blocks
lets later ones pass it, `max_head_passes` steps at most (then it is served first, as by arrival). A sequence
admitted with a prompt whose leading blocks are in the prefix cache (block_manager.py) starts after them; one whose
next blocks another running sequence is computing waits until they are cached, and later prompts pass it.

`continue_decoding` lets the engine queue the next decode step before the current one's tokens are read: each
sequence advances by one PENDING_TOKEN that `postprocess` later replaces with the sampled token.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.decoder.block_manager import BlockManager
from services.decoder.sequence import PENDING_TOKEN, FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int            # sequences holding KV blocks at once
    max_num_batched_tokens: int  # tokens in one forward pass (the chunked-prefill budget)
    max_prefill_tokens_while_decoding: int = 0   # prompt tokens of a step with decoding streams at first; 0: no bound
    max_head_passes: int = 8     # steps in which later prompts may pass a waiting one that does not fit


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int        # position of the first token computed in this step
    num_tokens: int   # tokens computed in this step

    @property
    def is_sampling(self) -> bool:
        """The chunk reaches the end of the sequence, so its last logits give the next token."""
        return self.start + self.num_tokens == len(self.seq)


@dataclass(slots=True)
class ScheduledBatch:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)   # ended by the scheduler itself (see schedule())
    # id() of the sequences a later batch continued before this one's tokens were read (continue_decoding)
    continued: set[int] = field(default_factory=set)

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def num_decoding(self) -> int:
        """Rows of sequences that decode (one generated token each); the rest are prompt tokens."""
        return sum(1 for chunk in self.chunks if chunk.num_tokens == 1 and chunk.start >= chunk.seq.num_prompt_tokens)

    @property
    def is_decode_only(self) -> bool:
        return all(chunk.num_tokens == 1 and chunk.is_sampling for chunk in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)


def prompt_chunk(num_left: int, budget: int, has_others_behind: bool) -> int:
    """A prompt's chunk this step: what is left of it, within the budget; half the budget at most while other
    prompts wait behind it, so a long image prompt does not hold up the short ones for its whole prefill."""
    if has_others_behind and num_left > budget // 2:
        budget = max(budget // 2, 1)
    return min(num_left, budget)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()   # by arrival; preempted sequences return to the front
        self.running: list[Sequence] = []         # by arrival
        self.max_prefill_tokens_while_decoding = config.max_prefill_tokens_while_decoding   # the engine moves it

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        # Each decoding sequence's token is set aside before any prompt takes from the budget.
        num_decoding_after = sum(1 for seq in self.running if seq.num_uncomputed_tokens == 1)
        prefill_budget = min(self.max_prefill_tokens_while_decoding or budget, budget) if num_decoding_after \
            else budget
        num_prefilling = sum(1 for seq in self.running if seq.num_uncomputed_tokens > 1) + len(self.waiting)
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            is_decoding = seq.num_uncomputed_tokens == 1
            if is_decoding:
                num_decoding_after -= 1
                num_tokens = 1
            else:
                num_prefilling -= 1
                num_tokens = prompt_chunk(seq.num_uncomputed_tokens, min(budget - num_decoding_after, prefill_budget),
                                         num_prefilling > 0)
                if num_tokens <= 0:
                    index += 1
                    continue
            if self.block_manager.num_new_blocks(seq, num_tokens) > self.block_manager.num_blocks - len(
                    seq.block_table):
                self.finish(seq, FinishReason.LENGTH)  # longer than the whole cache: it can never continue
                batch.finished.append(seq)
                continue
            if not self._make_room(seq, num_tokens, batch):
                break  # seq itself was preempted: it was the newest left
            self.block_manager.allocate(seq, num_tokens)
            batch.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
            budget -= num_tokens
            if not is_decoding:
                prefill_budget -= num_tokens
            index += 1
        # Admit new sequences only when nothing had to be preempted: they would take the blocks just freed. A
        # prompt whose next blocks a running sequence is computing waits to share them; the others pass it.
        position = 0
        while (position < len(self.waiting) and min(budget, prefill_budget) > 0 and not batch.preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[position]
            blocks = self.block_manager
            shared = blocks.match_prefix(seq)   # leading blocks whose KV is cached already
            if blocks.being_computed(seq, len(shared)) is not None:
                position += 1
                continue
            num_cached = len(shared) * blocks.block_size
            num_tokens = prompt_chunk(len(seq) - num_cached, min(budget, prefill_budget),
                                     position + 1 < len(self.waiting))
            if blocks.blocks_for(num_cached + num_tokens) - len(shared) > (blocks.num_free_blocks
                                                                          - blocks.num_unused(shared)):
                if seq.num_times_passed >= self.config.max_head_passes:
                    break   # it has waited long enough: nothing more passes it
                seq.num_times_passed += 1
                position += 1
                continue
            del self.waiting[position]
            seq.status = SequenceStatus.RUNNING
            blocks.share_prefix(seq, shared)
            blocks.allocate(seq, num_tokens)
            blocks.claim_prompt_blocks(seq)
            self.running.append(seq)
            batch.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
            budget -= num_tokens
            prefill_budget -= num_tokens
        return batch

    def _make_room(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Preempts the newest running sequences until `seq` fits; False if `seq` had to go itself."""
        while not self.block_manager.can_allocate(seq, num_tokens):
            victim = self.running.pop()
            self.block_manager.free(victim)
            victim.reset_for_recompute()
            self.waiting.appendleft(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def continue_decoding(self, batch: ScheduledBatch) -> ScheduledBatch | None:
        """The next decode step of the sequences of `batch`, a decode step whose tokens are not read yet.

        None when the next step needs the scheduler's full decision: prompts to prefill, sequences waiting for a
        slot, a running sequence outside `batch`, or blocks that only preemption would free. Sequences that end
        with this token by their length are left out; one that ends by its end-of-sequence token has computed one
        token for nothing, which postprocess() drops.
        """
        if not batch.is_decode_only or (self.waiting and len(self.running) < self.config.max_num_seqs):
            return None
        in_batch = {id(chunk.seq) for chunk in batch.chunks}
        if any(id(seq) not in in_batch for seq in self.running):
            return None
        seqs = [chunk.seq for chunk in batch.chunks
                if not chunk.seq.is_finished and not chunk.seq.ends_by_length_at(chunk.start + 1)]
        needed = sum(self.block_manager.num_new_blocks(seq, 2) for seq in seqs)   # this token and the next
        if not seqs or needed > self.block_manager.num_free_blocks:
            return None
        following = ScheduledBatch()
        for seq in seqs:
            seq.num_computed_tokens += 1   # the step in flight writes this position's KV
            self.block_manager.register_full_blocks(seq)
            seq.token_ids.append(PENDING_TOKEN)
            self.block_manager.allocate(seq, 1)
            following.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, 1))
            batch.continued.add(id(seq))
        return following

    def postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """Records the step's results; `sampled[i]` is the token of chunk i (None if it was not sampling).

        Returns the sequences that gained a token, finished ones included.
        """
        advanced = []
        for chunk, token_id in zip(batch.chunks, sampled, strict=True):
            seq = chunk.seq
            if seq.is_finished:  # aborted while the step ran, or ended by the token before a continued step
                continue
            if id(seq) in batch.continued:   # counted and allocated already: write in the token
                reason = seq.fill_pending_token(chunk.start + 1, token_id)
            else:
                seq.num_computed_tokens += chunk.num_tokens
                self.block_manager.register_full_blocks(seq)
                if not chunk.is_sampling:
                    continue
                reason = seq.append_token(token_id)
            if reason is not None:
                self.finish(seq, reason)
            advanced.append(seq)
        return advanced

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                self.finish(seq, reason)
                return seq
        return None
