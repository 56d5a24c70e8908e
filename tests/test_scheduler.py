"""Continuous batching logic, without torch."""

from __future__ import annotations

from services.decoder.block_manager import BlockManager
from services.decoder.scheduler import Scheduler, SchedulerConfig
from services.decoder.sequence import PENDING_TOKEN, FinishReason, SamplingParams, Sequence, SequenceStatus


def seq(request_id: str, num_prompt: int, arrival: int, max_tokens: int = 4) -> Sequence:
    return Sequence(request_id, list(range(100, 100 + num_prompt)), num_prompt, SamplingParams(max_tokens),
                    max_model_len=10_000, arrival=arrival, eos_token_id=2)


def scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=16) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget), BlockManager(num_blocks, block_size))


def run_step(s: Scheduler, token: int = 7):
    batch = s.schedule()
    return batch, s.postprocess(batch, [token if chunk.is_sampling else None for chunk in batch.chunks])


def test_long_prompt_is_prefilled_in_chunks_within_the_budget():
    s = scheduler(budget=16)
    a = seq("a", 40, 0)
    s.add(a)
    sizes = []
    while a.num_output_tokens == 0:
        batch, _ = run_step(s)
        sizes.append(batch.num_tokens)
    assert sizes == [16, 16, 8]
    assert a.num_computed_tokens == 40 and len(a) == 41


def test_decoding_sequences_keep_running_while_a_long_prompt_prefills():
    s = scheduler(budget=8)
    a = seq("a", 4, 0, max_tokens=50)
    s.add(a)
    run_step(s)                       # a: prompt done, first token sampled
    b = seq("b", 30, 1)
    s.add(b)
    for _ in range(4):
        batch, advanced = run_step(s)
        by_seq = {chunk.seq.request_id: chunk.num_tokens for chunk in batch.chunks}
        assert by_seq["a"] == 1 and a in advanced   # a decodes every step
        assert by_seq.get("b", 0) == 7               # b gets the rest of the budget
        assert batch.num_tokens <= 8


def test_finished_sequences_free_their_blocks_and_leave():
    s = scheduler()
    a, b = seq("a", 5, 0, max_tokens=2), seq("b", 3, 1, max_tokens=5)
    s.add(a), s.add(b)
    free_before = s.block_manager.num_free_blocks
    while not a.is_finished:
        run_step(s)
    assert a.finish_reason is FinishReason.LENGTH and a.block_table == []
    assert a not in s.running and b in s.running
    while not b.is_finished:
        run_step(s)
    assert s.block_manager.num_free_blocks == free_before and s.num_unfinished == 0


def test_eos_finishes_with_stop():
    s = scheduler()
    a = seq("a", 3, 0, max_tokens=10)
    s.add(a)
    run_step(s, token=a.eos_token_id)
    assert a.finish_reason is FinishReason.STOP and a.output_token_ids == [2]


def test_out_of_blocks_preempts_the_newest_and_recomputes_it_later():
    s = scheduler(num_blocks=6, block_size=4, budget=64)   # 24 token slots
    a, b = seq("a", 8, 0, max_tokens=12), seq("b", 8, 1, max_tokens=12)
    s.add(a), s.add(b)
    run_step(s)
    preempted = []
    for _ in range(8):
        batch, _ = run_step(s)
        preempted += batch.preempted
    assert b in preempted and a not in preempted
    assert a.num_output_tokens > b.num_output_tokens
    # b waits with its generated tokens kept: they are recomputed, not lost
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.num_output_tokens >= 1
    while not a.is_finished:
        run_step(s)
    while not b.is_finished:
        run_step(s)
    assert b.num_output_tokens == 12


def test_a_sequence_longer_than_the_whole_cache_ends_instead_of_looping():
    s = scheduler(num_blocks=2, block_size=4, budget=64)   # 8 token slots
    a = seq("a", 6, 0, max_tokens=10)
    s.add(a)
    for _ in range(5):
        run_step(s)
    # 8 cached tokens: 6 of prompt, 2 generated; the 3rd generated token needs no KV entry of its own
    assert a.is_finished and a.finish_reason is FinishReason.LENGTH and a.num_output_tokens == 3
    assert s.block_manager.num_free_blocks == 2


def test_max_num_seqs_bounds_the_running_set():
    s = scheduler(max_num_seqs=2, budget=64)
    for i in range(4):
        s.add(seq(str(i), 3, i))
    batch, _ = run_step(s)
    assert len(s.running) == 2 and len(s.waiting) == 2 and len(batch.chunks) == 2


def test_abort_frees_blocks_of_a_running_and_a_waiting_sequence():
    s = scheduler(max_num_seqs=1)
    a, b = seq("a", 9, 0), seq("b", 9, 1)
    s.add(a), s.add(b)
    run_step(s)
    assert a.block_table and s.abort("a") is a and a.finish_reason is FinishReason.CANCELLED
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks
    assert s.abort("b") is b and s.num_unfinished == 0
    assert s.abort("unknown") is None


def test_block_manager_counts_blocks_per_token():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq("a", 5, 0)
    assert bm.num_new_blocks(a, 5) == 2
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    assert bm.num_new_blocks(a, 3) == 0 and bm.num_new_blocks(a, 4) == 1
    assert not bm.can_allocate(a, 16)
    bm.free(a)
    assert bm.num_free_blocks == 4


def test_continuing_a_decode_step_advances_each_sequence_by_a_pending_token():
    s = scheduler(num_blocks=16, block_size=4)
    a, b = seq("a", 4, 0, max_tokens=10), seq("b", 3, 1, max_tokens=2)
    s.add(a)
    s.add(b)
    run_step(s)                        # both prompts: first tokens sampled
    decode = s.schedule()              # a at position 4, b at 3: b's token from this step is its last
    following = s.continue_decoding(decode)
    assert [(c.seq.request_id, c.start) for c in following.chunks] == [("a", 5)]
    assert a.token_ids[-1] == PENDING_TOKEN and a.num_computed_tokens == 5 and len(a.block_table) == 2
    advanced = s.postprocess(decode, [11, 12])   # the tokens of the first step arrive
    assert a.token_ids[5] == 11 and b.is_finished and b.finish_reason is FinishReason.LENGTH
    assert [x.request_id for x in advanced] == ["a", "b"]
    s.postprocess(following, [13])
    assert a.output_token_ids == [7, 11, 13] and a.num_computed_tokens == 6


def test_a_decode_step_is_not_continued_where_the_scheduler_must_decide():
    s = scheduler(num_blocks=16, block_size=4, max_num_seqs=2)
    a = seq("a", 4, 0, max_tokens=10)
    s.add(a)
    first, _ = run_step(s)
    assert s.continue_decoding(first) is None         # a prompt step
    decode = s.schedule()
    s.add(seq("b", 3, 1))
    assert s.continue_decoding(decode) is None        # b waits and there is a free slot: admit it first
    full = scheduler(num_blocks=2, block_size=4)
    c = seq("c", 7, 0, max_tokens=10)
    full.add(c)
    run_step(full)
    step = full.schedule()                            # position 7: the last slot of the cache
    assert full.continue_decoding(step) is None       # position 8 needs a block only preemption could free


def test_a_decoding_sequence_gets_its_token_even_behind_an_older_prompt_that_could_take_the_whole_budget():
    s = scheduler(num_blocks=256, budget=16)
    a, b = seq("a", 100, 0), seq("b", 2, 1, max_tokens=50)
    s.add(a), s.add(b)
    run_step(s)                       # a starts its prefill; b's prompt is done in the same step
    assert b.num_output_tokens == 1
    while not a.is_prompt_computed:
        left = a.num_uncomputed_tokens
        batch, advanced = run_step(s)
        by_seq = {chunk.seq.request_id: chunk.num_tokens for chunk in batch.chunks}
        assert by_seq["b"] == 1 and b in advanced        # older in the queue, a never takes b's token
        assert by_seq["a"] == min(15, left)


def test_a_step_with_decoding_streams_prefills_no_more_than_its_time_budget_allows():
    s = Scheduler(SchedulerConfig(8, 16, max_prefill_tokens_while_decoding=5), BlockManager(64, 4))
    a = seq("a", 30, 0)
    s.add(a)
    batch, _ = run_step(s)
    assert batch.num_tokens == 16     # nobody is decoding: the whole budget goes to the prompt
    s.add(seq("b", 3, 1, max_tokens=20))
    run_step(s)
    run_step(s)                       # a's prompt done (30 = 16 + 14); b's too
    c = seq("c", 40, 2)
    s.add(c)
    for _ in range(3):
        batch, _ = run_step(s)
        prefilled = sum(chunk.num_tokens for chunk in batch.chunks if chunk.seq is c)
        assert prefilled == 5 and batch.num_tokens == 5 + 2


def test_a_short_prompt_behind_a_long_one_starts_in_the_same_step():
    s = scheduler(num_blocks=256, budget=16)
    long, short = seq("long", 200, 0), seq("short", 6, 1)
    s.add(long), s.add(short)
    batch, advanced = run_step(s)
    by_seq = {chunk.seq.request_id: chunk.num_tokens for chunk in batch.chunks}
    assert by_seq == {"long": 8, "short": 6}       # the long one takes half while another waits behind it
    assert short in advanced                        # its prompt done: it samples in the first step
    batch, _ = run_step(s)
    assert {chunk.seq.request_id: chunk.num_tokens for chunk in batch.chunks} == {"long": 15, "short": 1}


def test_prompts_pass_one_too_large_for_the_free_blocks_a_bounded_number_of_steps():
    s = Scheduler(SchedulerConfig(8, 64, max_head_passes=2), BlockManager(10, 4))
    holder = seq("holder", 20, 0, max_tokens=50)          # 5 of the 10 blocks, then more as it decodes
    s.add(holder)
    run_step(s)
    big = seq("big", 24, 1)                                  # 6 blocks: does not fit beside holder
    s.add(big)
    small = [seq(f"small{i}", 3, 2 + i, max_tokens=1) for i in range(4)]
    for item in small:
        s.add(item)
    admitted = []
    for _ in range(4):
        batch, _ = run_step(s)
        admitted.append(sorted(chunk.seq.request_id for chunk in batch.chunks if chunk.seq.request_id != "holder"))
    assert big.status is SequenceStatus.WAITING and big.num_times_passed == 2
    assert admitted[0] == ["small0", "small1", "small2", "small3"]   # passed big in the first step
    small_after = seq("late", 3, 9)
    s.add(small_after)
    batch, _ = run_step(s)
    assert small_after.status is SequenceStatus.WAITING     # big has been passed twice: now nothing passes it
