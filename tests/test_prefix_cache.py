"""Prefix caching: a prompt that starts like one computed before shares its KV blocks and computes only the rest.

Scheduler and block manager logic (pure Python), then the engine on the tiny model: shared prefixes never change a
request's tokens, images with the same [IMG] token ids but other pixels never share, cached blocks are reused
after their first owner finished and evicted when memory is needed.
"""

from __future__ import annotations

import random

import pytest
import torch

from services.decoder.block_manager import BlockManager
from services.decoder.weights import load_decoder
from services.decoder.step_inputs import ImageInputs
from services.decoder.scheduler import Scheduler, SchedulerConfig
from services.decoder.sequence import FinishReason, SamplingParams, Sequence
from tests.test_engine import CPU, SAMPLINGS, Collector, clone, make_engine, run_alone

BLOCK = 4
PROMPT = list(range(100, 118))   # 18 tokens: 4 full blocks and 2 tokens


def text_seq(request_id: str, token_ids: list[int], arrival: int = 0, spans=(), images=None) -> Sequence:
    return Sequence(request_id, list(token_ids), len(token_ids), SamplingParams(4), max_model_len=10_000,
                    arrival=arrival, image_spans=tuple(spans), images=images)


def make_scheduler(num_blocks: int = 64, enabled: bool = True, budget: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(8, budget), BlockManager(num_blocks, BLOCK, enable_prefix_caching=enabled))


def run_to_end(s: Scheduler) -> None:
    for _ in range(100):
        batch = s.schedule()
        if not batch:
            return
        s.postprocess(batch, [7 if chunk.is_sampling else None for chunk in batch.chunks])


def admit(s: Scheduler, seq: Sequence):
    s.add(seq)
    batch = s.schedule()
    return next(chunk for chunk in batch.chunks if chunk.seq is seq), batch


def test_a_second_prompt_with_the_same_start_shares_its_full_blocks_and_computes_the_rest():
    s = make_scheduler()
    first = text_seq("a", PROMPT)
    chunk, batch = admit(s, first)
    assert chunk.start == 0 and chunk.num_tokens == 18
    s.postprocess(batch, [7])
    second = text_seq("b", PROMPT[:16] + [900, 901, 902], arrival=1)
    chunk, _ = admit(s, second)
    assert chunk.start == 16 and chunk.num_tokens == 3
    assert second.block_table[:4] == first.block_table[:4]
    assert second.block_table[4] != first.block_table[4]
    bm = s.block_manager
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == (18 + 19, 16)


def test_the_last_prompt_token_is_always_computed():
    s = make_scheduler()
    _, batch = admit(s, text_seq("a", PROMPT[:16]))
    s.postprocess(batch, [7])
    again = text_seq("b", PROMPT[:16], arrival=1)   # the same 16 tokens: 4 full blocks
    chunk, _ = admit(s, again)
    assert (chunk.start, chunk.num_tokens) == (12, 4) and chunk.is_sampling


def test_blocks_stay_cached_after_their_owner_finished_and_the_least_recently_used_go_first():
    s = make_scheduler(num_blocks=8)
    first = text_seq("a", PROMPT)
    s.add(first)
    run_to_end(s)   # 18 + 3 tokens computed: 5 full blocks registered, a sixth block partly filled
    bm = s.block_manager
    assert first.is_finished and bm.num_free_blocks == 8 and bm.num_cached_blocks == 5
    later = text_seq("b", PROMPT, arrival=1)
    chunk, _ = admit(s, later)
    assert chunk.start == 16 and bm.num_free_blocks == 8 - 5
    s.finish(later, FinishReason.CANCELLED)
    # 5 blocks for a new prompt: the 3 free ones, then 2 cached ones, the prompt's tail first.
    other = text_seq("c", list(range(500, 520)), arrival=2)
    chunk, _ = admit(s, other)
    assert chunk.start == 0 and len(other.block_table) == 5 and bm.num_free_blocks == 3
    assert len(bm.match_prefix(text_seq("d", PROMPT, arrival=3))) == 3   # its first 3 blocks are still there
    # The rest of the memory too: nothing of the prompt is left.
    last = text_seq("e", list(range(600, 612)), arrival=4)
    admit(s, last)
    assert bm.num_free_blocks == 0 and bm.match_prefix(text_seq("f", PROMPT, arrival=5)) == []
    s.finish(other, FinishReason.CANCELLED)
    s.finish(last, FinishReason.CANCELLED)
    assert bm.num_free_blocks == 8


def test_a_shared_block_is_freed_only_when_its_last_user_finishes():
    s = make_scheduler(num_blocks=16)
    a = text_seq("a", PROMPT)
    _, batch = admit(s, a)
    s.postprocess(batch, [7])
    b = text_seq("b", PROMPT + [5], arrival=1)
    admit(s, b)
    shared = b.block_table[:4]
    assert shared == a.block_table[:4]
    s.finish(a, FinishReason.CANCELLED)
    bm = s.block_manager
    assert bm.num_free_blocks == 16 - len(b.block_table)   # a's own fifth block is free, the shared ones are not
    assert len(bm.match_prefix(text_seq("c", PROMPT, arrival=2))) == 4
    s.finish(b, FinishReason.CANCELLED)
    assert bm.num_free_blocks == 16


def test_image_identity_decides_sharing_not_the_image_token_ids():
    img = [10] * 8
    tokens = [1, 2, 3, 4] + img + [20, 21, 22, 23, 24]     # blocks 1 and 2 hold the image's [IMG] tokens
    s = make_scheduler()
    _, batch = admit(s, text_seq("a", tokens, spans=[(4, 12, "aa" * 32)], images=object()))
    s.postprocess(batch, [7])
    same = text_seq("b", tokens, arrival=1, spans=[(4, 12, "aa" * 32)], images=object())
    other = text_seq("c", tokens, arrival=2, spans=[(4, 12, "bb" * 32)], images=object())
    unknown = text_seq("d", tokens, arrival=3, images=object())   # features without an identity: never shared
    bm = s.block_manager
    assert len(bm.match_prefix(same)) == 4
    assert len(bm.match_prefix(other)) == 1   # only the block before the image
    assert bm.match_prefix(unknown) == []


def test_disabled_prefix_caching_shares_nothing():
    s = make_scheduler(enabled=False)
    _, batch = admit(s, text_seq("a", PROMPT))
    s.postprocess(batch, [7])
    chunk, _ = admit(s, text_seq("b", PROMPT, arrival=1))
    assert chunk.start == 0 and s.block_manager.num_cached_blocks == 0


def test_a_preempted_sequence_is_recomputed_from_its_cached_blocks():
    s = make_scheduler(num_blocks=8)
    a = Sequence("a", list(range(100, 114)), 14, SamplingParams(8), max_model_len=10_000, arrival=0)   # 4 blocks
    b = Sequence("b", list(range(300, 313)), 13, SamplingParams(8), max_model_len=10_000, arrival=1)   # 4 blocks
    s.add(a)
    s.add(b)
    preempted_at, readmitted = None, None
    for step in range(40):
        batch = s.schedule()
        if b in batch.preempted:
            preempted_at = step
            num_computed_before = len(b) - 1   # every token but the last sampled one was computed
        for chunk in batch.chunks:
            if chunk.seq is b and preempted_at is not None and readmitted is None:
                readmitted = chunk
        s.postprocess(batch, [7 if chunk.is_sampling else None for chunk in batch.chunks])
        if a.is_finished and b.is_finished:
            break
    assert preempted_at is not None, "the cache was never short of blocks"
    # b had 3 full blocks and a partial one. a took the partial one (free) and, two tokens later, b's third block
    # (cached blocks go tail first); b came back sharing its first two and computed the rest again.
    assert num_computed_before // 4 == 3
    assert readmitted is not None and readmitted.start == 8
    assert s.block_manager.num_hit_tokens == 8
    assert a.is_finished and b.is_finished and len(b.output_token_ids) == 8


def test_a_prompt_waits_for_the_blocks_another_is_computing_and_later_prompts_pass_it():
    s = make_scheduler(budget=8)   # the first prompt's 18 tokens take three steps
    first = text_seq("a", PROMPT)
    s.add(first)
    batch = s.schedule()
    assert [c.seq.request_id for c in batch.chunks] == ["a"]
    same = text_seq("b", PROMPT, arrival=1)           # the same prompt, while the first is being computed
    other = text_seq("c", list(range(500, 505)), arrival=2)
    s.add(same)
    s.add(other)
    s.postprocess(batch, [None])
    admitted = []
    while not first.is_prompt_computed:
        batch = s.schedule()
        admitted += [c.seq.request_id for c in batch.chunks if c.start == 0 and c.seq is not first]
        assert all(c.seq is not same for c in batch.chunks)
        s.postprocess(batch, [7 if c.is_sampling else None for c in batch.chunks])
    assert admitted == ["c"]   # the other prompt passed the waiting one
    chunk = next(c for c in s.schedule().chunks if c.seq is same)
    assert (chunk.start, chunk.num_tokens) == (16, 2)   # four full blocks shared, not computed twice
    assert same.block_table[:4] == first.block_table[:4] and same.num_cached_prompt_tokens == 16


def test_a_prompt_waits_only_while_the_blocks_it_would_share_are_being_computed():
    s = make_scheduler(budget=8)
    first = text_seq("a", PROMPT)
    admit(s, first)
    bm = s.block_manager
    assert bm.being_computed(text_seq("b", PROMPT, arrival=1), 0) is first
    assert bm.being_computed(text_seq("c", PROMPT[:4] + [900] * 14, arrival=2), 1) is None   # it parts after block 0
    assert bm.being_computed(text_seq("d", list(range(500, 518)), arrival=3), 0) is None
    img = [1, 2, 3, 4] + [10] * 8 + [20, 21, 22, 23, 24]
    admit(s, text_seq("e", img, arrival=4, spans=[(4, 12, "aa" * 32)], images=object()))
    assert bm.being_computed(text_seq("f", img, arrival=5, spans=[(4, 12, "aa" * 32)], images=object()), 1)
    assert not bm.being_computed(text_seq("g", img, arrival=6, spans=[(4, 12, "bb" * 32)], images=object()), 1)
    # The one computing them ends (cancelled, preempted): the waiting prompt computes them itself.
    s.finish(first, FinishReason.CANCELLED)
    waiting = text_seq("h", PROMPT, arrival=7)
    assert bm.being_computed(waiting, 0) is None
    chunk, _ = admit(s, waiting)
    assert chunk.start == 0


def test_without_prefix_caching_nothing_waits():
    s = make_scheduler(enabled=False, budget=8)
    admit(s, text_seq("a", PROMPT))
    chunk, _ = admit(s, text_seq("b", PROMPT, arrival=1))
    assert chunk.start == 0


# -- the engine on the tiny model: tokens never change --------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny_model):
    return load_decoder(tiny_model, torch.float32, CPU)


def image_request(index: int, prefix: list[int], features: torch.Tensor, sha: str, question_len: int,
                  sampling: SamplingParams) -> Sequence:
    """[BOS] + `prefix` (with [IMG] tokens, id 10, where the image is) + a question of its own."""
    rng = random.Random(index)
    ids = [1, *prefix, *(rng.randrange(1000, 130000) for _ in range(question_len))]
    positions = [p for p, token in enumerate(ids) if token == 10]
    return Sequence(f"r{index}", ids, len(ids), sampling, max_model_len=4096, arrival=index,
                    images=ImageInputs(features, torch.tensor(positions)),
                    image_spans=((positions[0], positions[-1] + 1, sha),))


def test_engine_outputs_with_shared_prefixes_equal_the_single_request_outputs(model):
    rng = random.Random(3)
    prefix = [rng.randrange(1000, 130000) for _ in range(5)] + [10] * 40 + [rng.randrange(1000, 130000)
                                                                           for _ in range(6)]
    features = torch.randn(40, 64, generator=torch.Generator().manual_seed(9))
    other_features = torch.randn(40, 64, generator=torch.Generator().manual_seed(10))
    requests = [image_request(30 + i, prefix, features, "aa" * 32, 3 + 5 * i, SAMPLINGS[i]) for i in range(4)]
    # Same [IMG] token ids, other pixels: must not take the first image's KV.
    requests.append(image_request(40, prefix, other_features, "bb" * 32, 8, SAMPLINGS[4]))
    expected = {seq.request_id: run_alone(model, clone_with_spans(seq)) for seq in requests}

    engine = make_engine(model, "--max-num-batched-tokens", "32", "--max-num-seqs", "3")
    collector = Collector()
    engine.add(requests[0], collector.sink)
    for step in range(400):
        if step in (6, 9, 12, 15):   # later requests arrive while the first ones decode or have finished
            engine.add(requests[(6, 9, 12, 15).index(step) + 1], collector.sink)
        engine.step()
        if all(seq.is_finished for seq in requests):
            break
    for seq in requests:
        assert collector.tokens(seq.request_id) == expected[seq.request_id], seq.request_id
    stats = engine.stats()
    assert stats.num_prefix_hit_tokens >= 3 * 48, stats   # 3 later requests x 3 full blocks of 16 at least
    assert stats.num_free_blocks == stats.num_blocks


def clone_with_spans(seq: Sequence) -> Sequence:
    copy = clone(seq)
    copy.image_spans = seq.image_spans
    return copy
