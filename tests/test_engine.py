"""The decoder engine on CPU: batching never changes a request's tokens; memory and admission are bounded."""

from __future__ import annotations

import random

import pytest
import torch

from services.decoder.config import DecoderConfig
from services.decoder.engine import Engine
from services.decoder.factory import build_engine_for
from services.decoder.outputs import EngineOutput
from services.decoder.weights import load_decoder
from services.decoder.step_inputs import ImageInputs
from services.decoder.sequence import FinishReason, SamplingParams, Sequence
from shared.errors import Overloaded

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_decoder(tiny_model, torch.float32, CPU)


def make_engine(model, *flags: str, overlap: bool = False) -> Engine:
    """`overlap`: the next decode step is launched before the current one is read, as on CUDA by default."""
    engine, _ = build_engine_for(model, DecoderConfig.load(list(flags)), CPU)
    engine.overlap = overlap
    return engine


def make_request(index: int, num_prompt: int, num_images: int, sampling: SamplingParams) -> Sequence:
    """A prompt of `num_prompt` tokens whose first `num_images * 6` positions after BOS are [IMG] tokens."""
    rng = random.Random(index)
    ids = [1] + [rng.randrange(1000, 130000) for _ in range(num_prompt - 1)]
    positions = list(range(1, 1 + 6 * num_images))
    for p in positions:
        ids[p] = 10
    images = None
    if positions:
        features = torch.randn(len(positions), 64, generator=torch.Generator().manual_seed(index))
        images = ImageInputs(features, torch.tensor(positions))
    return Sequence(f"r{index}", ids, len(ids), sampling, max_model_len=4096, arrival=index, images=images)


def clone(seq: Sequence, eos_token_id: int | None = None) -> Sequence:
    return Sequence(seq.request_id, list(seq.token_ids[:seq.num_prompt_tokens]), seq.num_prompt_tokens,
                    seq.sampling, seq.max_model_len, seq.arrival, seq.images,
                    eos_token_id=seq.eos_token_id if eos_token_id is None else eos_token_id)


class Collector:
    def __init__(self):
        self.outputs: dict[str, list[EngineOutput]] = {}

    def sink(self, output: EngineOutput) -> None:
        self.outputs.setdefault(output.request_id, []).append(output)

    def tokens(self, request_id: str) -> list[int]:
        return [t for output in self.outputs[request_id] for t in output.token_ids]

    def finish_reason(self, request_id: str):
        return self.outputs[request_id][-1].finish_reason


def run_alone(model, seq: Sequence) -> list[int]:
    engine = make_engine(model)
    collector = Collector()
    engine.add(seq, collector.sink)
    while collector.outputs.get(seq.request_id, [None])[-1] is None or \
            collector.finish_reason(seq.request_id) is None:
        engine.step()
    return collector.tokens(seq.request_id)


def fail_forward_passes(engine: Engine, monkeypatch):
    """Every forward pass of `engine` raises until the returned function restores its runner."""
    original = engine.runner.launch

    def fail(batch, previous=None):
        raise RuntimeError("injected")
    monkeypatch.setattr(engine.runner, "launch", fail)
    return lambda: monkeypatch.setattr(engine.runner, "launch", original)


SAMPLINGS = [SamplingParams(9), SamplingParams(7, temperature=0.9, seed=5),
             SamplingParams(11, temperature=1.2, top_k=40, top_p=0.8, seed=77), SamplingParams(5),
             SamplingParams(8, temperature=0.7, top_p=0.5, seed=3), SamplingParams(6)]


@pytest.mark.parametrize("overlap", [False, True], ids=["read-each-step", "overlapped"])
def test_requests_joining_and_leaving_mid_way_get_their_single_request_tokens(model, overlap):
    requests = [make_request(i, num_prompt=n, num_images=k, sampling=s) for i, (n, k, s) in
                enumerate(zip([30, 75, 12, 140, 9, 55], [1, 2, 0, 3, 0, 1], SAMPLINGS))]
    expected = {seq.request_id: run_alone(model, clone(seq)) for seq in requests}

    # A small budget forces chunked prefill; requests arrive while others decode and finish.
    engine = make_engine(model, "--max-num-batched-tokens", "24", "--max-num-seqs", "3", overlap=overlap)
    collector = Collector()
    arrivals = {0: [0, 1], 2: [2], 5: [3], 9: [4, 5]}
    for step in range(400):
        for index in arrivals.get(step, []):
            engine.add(requests[index], collector.sink)
        engine.step()
        if len(collector.outputs) == len(requests) and all(
                collector.finish_reason(r.request_id) is not None for r in requests):
            break
    for seq in requests:
        assert collector.tokens(seq.request_id) == expected[seq.request_id], seq.request_id
        assert collector.finish_reason(seq.request_id) is FinishReason.LENGTH
        assert len(collector.tokens(seq.request_id)) == seq.sampling.max_tokens
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == stats.num_waiting == 0
    assert (stats.num_overlapped_steps > 0) == overlap


def test_a_stream_ending_on_its_eos_token_while_the_next_step_runs_drops_that_step(model):
    """With overlap, the step after a sequence's end-of-sequence token is already launched when the token is
    read: its token is dropped, the sequence ends where it would alone, and its KV blocks come back."""
    base = [make_request(60 + i, num_prompt=20 + 7 * i, num_images=i % 2, sampling=SAMPLINGS[i]) for i in range(3)]
    alone = [run_alone(model, clone(seq)) for seq in base]
    # each stream's end-of-sequence token: a token it samples at a different step, not sampled before
    ends = [next(i for i in range(2 + j, len(t)) if t[i] not in t[:i]) for j, t in enumerate(alone)]
    requests = [clone(seq, eos_token_id=alone[j][ends[j]]) for j, seq in enumerate(base)]
    engine = make_engine(model, overlap=True)
    collector = Collector()
    for seq in requests:
        engine.add(seq, collector.sink)
    for _ in range(100):
        engine.step()
        if all(seq.is_finished for seq in requests) and engine.stats().num_running == 0:
            break
    for j, seq in enumerate(requests):
        assert collector.tokens(seq.request_id) == alone[j][:ends[j] + 1]
        assert collector.finish_reason(seq.request_id) is FinishReason.STOP
        assert seq.token_ids[seq.num_prompt_tokens:] == alone[j][:ends[j] + 1]
    stats = engine.stats()
    assert stats.num_overlapped_steps > 0
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == stats.num_waiting == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["read-each-step", "overlapped"])
def test_preemption_and_recomputation_keep_the_tokens(model, overlap):
    requests = [make_request(10 + i, num_prompt=45, num_images=1, sampling=SAMPLINGS[i % 3]) for i in range(4)]
    expected = {seq.request_id: run_alone(model, clone(seq)) for seq in requests}
    # 7 blocks of 16 tokens (8 KiB each in the tiny model): two of these 52- to 56-token sequences do not fit.
    engine = make_engine(model, "--kv-cache-gib", str(7 * 8192 / 2**30), overlap=overlap)
    assert engine.scheduler.block_manager.num_blocks == 7
    collector = Collector()
    for seq in requests:
        engine.add(seq, collector.sink)
    for _ in range(500):
        engine.step()
        if all(s.is_finished for s in requests):
            break
    assert engine.stats().num_preempted > 0
    for seq in requests:
        assert collector.tokens(seq.request_id) == expected[seq.request_id]


@pytest.mark.parametrize("overlap", [False, True], ids=["read-each-step", "overlapped"])
def test_cancel_returns_kv_memory_at_once_and_ends_the_stream(model, overlap):
    engine = make_engine(model, overlap=overlap)
    collector = Collector()
    baseline = engine.stats().num_free_blocks
    a = make_request(20, num_prompt=60, num_images=1, sampling=SamplingParams(100))
    b = make_request(21, num_prompt=20, num_images=0, sampling=SamplingParams(5))
    engine.add(a, collector.sink)
    engine.add(b, collector.sink)
    for _ in range(3):
        engine.step()
    assert engine.stats().num_free_blocks < baseline
    engine.abort(a.request_id)
    engine.step()
    assert collector.finish_reason(a.request_id) is FinishReason.CANCELLED
    while not b.is_finished:
        engine.step()
    assert collector.finish_reason(b.request_id) is FinishReason.LENGTH
    assert engine.stats().num_free_blocks == baseline


def test_a_flood_is_queued_up_to_the_bound_then_refused(model):
    engine = make_engine(model, "--max-num-seqs", "2", "--max-queued", "3")
    collector = Collector()
    accepted, refused = [], 0
    for i in range(8):
        seq = make_request(30 + i, num_prompt=10, num_images=0, sampling=SamplingParams(3))
        try:
            engine.add(seq, collector.sink)
            accepted.append(seq)
        except Overloaded:
            refused += 1
    assert len(accepted) == 5 and refused == 3
    for _ in range(100):
        engine.step()
    assert all(collector.finish_reason(seq.request_id) is FinishReason.LENGTH for seq in accepted)
    late = make_request(40, num_prompt=10, num_images=0, sampling=SamplingParams(3))
    engine.add(late, collector.sink)   # room again once the flood drained


def test_a_sequence_the_scheduler_ends_gets_its_last_output(model):
    """Longer than the whole KV cache: the scheduler ends it by length, and its stream still gets its last message."""
    engine = make_engine(model, "--kv-cache-gib", "0.0000153")   # 2 blocks of 16 tokens on the tiny model
    assert engine.stats().num_blocks == 2
    collector = Collector()
    seq = make_request(45, num_prompt=20, num_images=0, sampling=SamplingParams(100))
    seq.max_model_len = 1000
    engine.add(seq, collector.sink)
    for _ in range(50):
        engine.step()
        if collector.outputs.get(seq.request_id) and collector.finish_reason(seq.request_id) is not None:
            break
    assert collector.finish_reason(seq.request_id) is FinishReason.LENGTH
    assert [o.finish_reason is not None for o in collector.outputs[seq.request_id]].count(True) == 1
    assert engine.admission.num_unfinished == 0 and engine.stats().num_free_blocks == 2


def test_a_request_added_as_the_engine_closes_gets_its_last_output(model):
    """Reserved before the engine stopped, added after: nobody would take it up, so add() ends it itself."""
    engine = make_engine(model)
    engine.start()
    engine.admission.reserve()   # as the service does, before it fetches the request's image features
    engine.stop()
    collector = Collector()
    seq = make_request(46, num_prompt=10, num_images=0, sampling=SamplingParams(3))
    engine.add(seq, collector.sink, is_reserved=True)
    assert [output.finish_reason for output in collector.outputs[seq.request_id]] == [FinishReason.CANCELLED]
    assert engine.admission.num_unfinished == 0


def test_a_failing_forward_pass_ends_its_streams_with_error_and_the_engine_goes_on(model, monkeypatch):
    engine = make_engine(model)
    collector = Collector()
    a = make_request(50, num_prompt=12, num_images=0, sampling=SamplingParams(4))
    engine.add(a, collector.sink)
    restore = fail_forward_passes(engine, monkeypatch)
    engine.step()
    assert collector.finish_reason(a.request_id) is FinishReason.ERROR
    assert "RuntimeError" in collector.outputs[a.request_id][-1].error
    restore()
    b = make_request(51, num_prompt=12, num_images=0, sampling=SamplingParams(4))
    engine.add(b, collector.sink)
    while not b.is_finished:
        engine.step()
    assert collector.finish_reason(b.request_id) is FinishReason.LENGTH
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_a_failed_forward_pass_makes_the_engine_unhealthy_until_its_probe_runs(model, monkeypatch):
    engine = make_engine(model)
    health = []
    engine.failures.on_health = health.append
    collector = Collector()
    a = make_request(52, num_prompt=12, num_images=0, sampling=SamplingParams(4))
    engine.add(a, collector.sink)
    restore = fail_forward_passes(engine, monkeypatch)
    engine.step()
    assert health == [False] and not engine.failures.is_healthy
    assert engine.stats().num_waiting == 1   # the engine's own one-token probe
    restore()
    engine.step()
    assert health == [False, True] and engine.failures.is_healthy
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_failed_steps) == (0, 0, 1)
    assert stats.num_free_blocks == stats.num_blocks


def test_forward_passes_failing_in_a_row_stop_the_engine_and_end_every_request(model, monkeypatch):
    import threading

    from shared.errors import Unavailable
    engine = make_engine(model, "--max-forward-failures", "3")
    engine.failures.retry_interval_s = 0.01
    fatal = threading.Event()
    engine.failures.on_fatal = fatal.set
    fail_forward_passes(engine, monkeypatch)
    collector = Collector()
    a = make_request(53, num_prompt=12, num_images=0, sampling=SamplingParams(4))
    engine.add(a, collector.sink)
    engine.start()
    assert fatal.wait(10)
    assert engine.stats().num_failed_steps == 3
    assert collector.finish_reason(a.request_id) is FinishReason.ERROR
    with pytest.raises(Unavailable):
        engine.add(make_request(54, num_prompt=12, num_images=0, sampling=SamplingParams(4)), collector.sink)


def test_a_step_failing_while_the_next_one_is_queued_ends_each_stream_once(model, monkeypatch):
    engine = make_engine(model, overlap=True)
    collector = Collector()
    a = make_request(70, num_prompt=12, num_images=0, sampling=SamplingParams(50))
    b = make_request(71, num_prompt=30, num_images=1, sampling=SamplingParams(50))
    for seq in (a, b):
        engine.add(seq, collector.sink)
    while engine.stats().num_overlapped_steps < 3:
        engine.step()
    engine.abort(a.request_id)   # a ends while its token is in flight: its stream must not end twice

    def fail(step):
        raise RuntimeError("injected at read")
    monkeypatch.setattr(engine.runner, "collect", fail)
    engine.step()
    assert collector.finish_reason(a.request_id) is FinishReason.CANCELLED
    assert collector.finish_reason(b.request_id) is FinishReason.ERROR
    assert [o.finish_reason is not None for o in collector.outputs[b.request_id]].count(True) == 1
    assert [o.finish_reason is not None for o in collector.outputs[a.request_id]].count(True) == 1
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == 0
    assert engine.admission.num_unfinished == 1   # only the engine's own probe


def test_a_launch_failing_while_a_step_is_in_flight_ends_both_and_leaves_the_engine_unhealthy(model, monkeypatch):
    engine = make_engine(model, overlap=True)
    health = []
    engine.failures.on_health = health.append
    collector = Collector()
    a = make_request(72, num_prompt=12, num_images=0, sampling=SamplingParams(50))
    engine.add(a, collector.sink)
    while engine.stats().num_overlapped_steps < 2:
        engine.step()
    restore = fail_forward_passes(engine, monkeypatch)
    engine.step()                      # the next step fails to launch; the one in flight is dropped with it
    assert collector.finish_reason(a.request_id) is FinishReason.ERROR and health == [False]
    restore()
    engine.step()                      # the probe runs: healthy only once a new forward pass has worked
    assert health == [False]
    engine.step()
    assert health == [False, True] and engine.failures.is_healthy
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == stats.num_waiting == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_a_constrained_sequence_follows_its_format_and_leaves_the_others_unchanged(model, overlap):
    """A grammar's mask for each token is filled once the token before it is read, also when the step is queued
    before that read (overlap): the constrained stream follows its format, the others keep their own tokens."""
    import re

    from shared.structured_output import FormatCompiler, ResponseFormat
    from shared.tokenizer import load_tokenizer
    pattern = r"[a-z]{3,12}( [a-z]{2,8}){2,4}\."
    compiled = FormatCompiler(load_tokenizer()).compile(ResponseFormat("regex", pattern))
    free = [make_request(80 + i, num_prompt=15 + 9 * i, num_images=i % 2, sampling=SAMPLINGS[i]) for i in range(3)]
    alone = [run_alone(model, clone(seq)) for seq in free]
    constrained = make_request(90, num_prompt=18, num_images=1, sampling=SamplingParams(60, temperature=1.0, seed=4))
    constrained.constraint = compiled.matcher()
    engine = make_engine(model, overlap=overlap)
    collector = Collector()
    for seq in [*free, constrained]:
        engine.add(seq, collector.sink)
    for _ in range(200):
        engine.step()
        if all(seq.is_finished for seq in [*free, constrained]) and engine.stats().num_running == 0:
            break
    for j, seq in enumerate(free):
        assert collector.tokens(seq.request_id) == alone[j]
    tokens = collector.tokens(constrained.request_id)
    assert collector.finish_reason(constrained.request_id) is FinishReason.STOP and tokens[-1] == 2
    assert re.fullmatch(pattern, load_tokenizer().decode(tokens)), load_tokenizer().decode(tokens)
    assert (engine.stats().num_overlapped_steps > 0) == overlap


def test_n_completions_wait_for_the_first_ones_prompt_and_share_its_blocks(model):
    engine = make_engine(model)
    collector = Collector()
    first = make_request(95, num_prompt=70, num_images=0, sampling=SamplingParams(4, temperature=1.0, seed=1))
    others = [clone(first) for _ in range(2)]
    for index, seq in enumerate(others, start=1):
        seq.request_id, seq.choice_index = f"{first.request_id}.{index}", index
        seq.sampling = SamplingParams(4, temperature=1.0, seed=1 + index)
    for seq in (first, *others):
        engine.add(seq, collector.sink)
    engine.step()   # the first one's whole prompt; the others wait for it
    assert first.is_prompt_computed and all(seq.num_computed_tokens == 0 for seq in others)
    while not all(seq.is_finished for seq in (first, *others)):
        engine.step()
    assert first.num_cached_prompt_tokens == 0
    assert all(seq.num_cached_prompt_tokens == 64 for seq in others)   # 4 full blocks of the 70-token prompt
    alone = [run_alone(model, clone(seq)) for seq in others]
    assert [collector.tokens(seq.request_id) for seq in others] == alone
