"""Bookkeeping of the paged KV cache: which fixed-size blocks each sequence owns. Pure Python, no tensors.

The KV memory itself is allocated once at start-up (model_runner.py); this class only hands out block ids.
A sequence's token at position p lives in block block_table[p // block_size], slot p % block_size.

Prefix caching: a block full of computed tokens is registered under its content hash (Sequence.block_hashes: the
tokens before it and in it, and the images among them). A new sequence whose prompt starts with registered blocks
shares them (reference counts) and only computes the rest: the same image asked about again, a system prompt, the
earlier turns of a chat. Shared blocks are full and never written again. A registered block that no sequence uses
any more stays cached until its memory is needed: free blocks are handed out first, then cached ones, least
recently used first.

A prompt whose next blocks a running sequence is computing now (the same image asked about twice at once, the n
completions of one request) waits for them rather than computing them too: each admitted sequence claims the full
blocks of its prompt it will compute, and `being_computed` tells the scheduler which sequence holds a claim.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from services.decoder.sequence import Sequence, SequenceStatus


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))   # blocks holding nothing reusable
        self._refs = [0] * num_blocks                       # sequences using each block
        self._cached: dict[bytes, int] = {}                 # content hash -> block holding that KV
        self._hash_of: dict[int, bytes] = {}                # block -> its content hash, for registered blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()   # registered, unused; least recently used first
        self._claims: dict[bytes, Sequence] = {}            # content hash -> the running sequence computing it
        self.num_queried_tokens = 0   # prompt tokens of sequences admitted (stats)
        self.num_hit_tokens = 0       # of those, tokens whose KV came from the prefix cache

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get: free ones and cached ones nobody uses."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` must gain to hold `num_new_tokens` more computed tokens."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        count = self.num_new_blocks(seq, num_new_tokens)
        if count > self.num_free_blocks:
            raise RuntimeError("out of KV blocks: call can_allocate first")
        for _ in range(count):
            block = self._take_free_block()
            self._refs[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        self._drop_claims(seq)
        # Last blocks first: a prompt's tail is evicted before its head, which more sequences share.
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.num_cached_blocks = 0

    def _take_free_block(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)
        del self._cached[self._hash_of.pop(block)]
        return block

    # -- prefix caching -------------------------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Registered blocks holding the KV of `seq`'s leading full blocks; the last token is always left to
        compute (its logits give the first new token). Changes nothing."""
        if not self.enable_prefix_caching or not seq.is_shareable:
            return []
        hits = []
        for digest in seq.block_hashes(self.block_size, (len(seq) - 1) // self.block_size):
            block = self._cached.get(digest)
            if block is None:
                break
            hits.append(block)
        return hits

    def num_unused(self, blocks: list[int]) -> int:
        """How many of `blocks` are cached but unused: taking them leaves fewer free blocks."""
        return sum(1 for block in blocks if self._refs[block] == 0)

    def share_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        """Gives a sequence with no blocks yet the matched `blocks`: its first tokens are computed."""
        assert not seq.block_table and seq.num_computed_tokens == 0, "a prefix is shared before anything is computed"
        for block in blocks:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        seq.block_table = list(blocks)
        seq.num_cached_blocks = len(blocks)
        seq.num_computed_tokens = len(blocks) * self.block_size
        if seq.num_output_tokens == 0:   # its first admission (a preempted sequence is admitted again)
            seq.num_cached_prompt_tokens = seq.num_computed_tokens
        self.num_queried_tokens += seq.num_prompt_tokens
        self.num_hit_tokens += seq.num_computed_tokens

    def register_full_blocks(self, seq: Sequence) -> None:
        """Registers the blocks of `seq` that are now full of computed tokens, for later sequences to share."""
        if not self.enable_prefix_caching or not seq.is_shareable:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_cached_blocks:
            return
        hashes = seq.block_hashes(self.block_size, num_full)
        for index in range(seq.num_cached_blocks, num_full):
            block, digest = seq.block_table[index], hashes[index]
            if self._claims.get(digest) is seq:
                del self._claims[digest]
            if digest not in self._cached and block not in self._hash_of:
                self._cached[digest] = block
                self._hash_of[block] = digest
        seq.num_cached_blocks = num_full

    def claim_prompt_blocks(self, seq: Sequence) -> None:
        """Records the full blocks of an admitted sequence's prompt past those it shares, which it computes now."""
        if not self.enable_prefix_caching or not seq.is_shareable:
            return
        for digest in self._uncached_prompt_hashes(seq):
            self._claims.setdefault(digest, seq)

    def being_computed(self, seq: Sequence, num_shared: int) -> Sequence | None:
        """The running sequence computing the block of `seq`'s prompt that follows its `num_shared` cached ones
        (match_prefix), if another one is: `seq` can wait and share it."""
        count = num_shared + 1
        if not self._claims or not seq.is_shareable or count * self.block_size > len(seq) - 1:
            return None
        digest = seq.block_hashes(self.block_size, count)[-1]
        owner = self._claims.get(digest)
        if owner is None or owner is seq:
            return None
        if owner.status is not SequenceStatus.RUNNING or owner.num_computed_tokens >= count * self.block_size:
            del self._claims[digest]   # not expected (free and registration drop claims): never let one hold a prompt
            return None
        return owner

    def _drop_claims(self, seq: Sequence) -> None:
        if not self._claims or not seq.is_shareable:
            return
        for digest in self._uncached_prompt_hashes(seq):
            if self._claims.get(digest) is seq:
                del self._claims[digest]

    def _uncached_prompt_hashes(self, seq: Sequence) -> list[bytes]:
        """Hashes of the full blocks of `seq`'s prompt past those registered for it: the ones it claims."""
        return seq.block_hashes(self.block_size, seq.num_prompt_tokens // self.block_size)[seq.num_cached_blocks:]

    def reset_prefix_cache(self) -> None:
        """Forgets every registered block (their KV may be wrong: a forward pass failed while writing)."""
        self._claims.clear()
        for block in list(self._evictable):
            self._free.append(block)
        self._evictable.clear()
        self._cached.clear()
        self._hash_of.clear()
