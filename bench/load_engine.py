"""`bench/load.py --engine-only`: the decoder engine alone in this process, no gRPC nor gateway, as the baseline
of the per-token cost of streaming."""

from __future__ import annotations

import random
import statistics
import time

from bench.load_calls import parse_range


def engine_only(args) -> dict:
    """Waves of `--concurrency` text-only sequences through the tiny decoder's engine in this process, with one torch
    thread (what the launcher gives a model process on a 2-core machine): tokens/s and seconds per step."""
    import torch

    from services.decoder.config import DecoderConfig
    from services.decoder.factory import build_engine_for
    from services.decoder.weights import load_decoder
    from services.decoder.sequence import SamplingParams, Sequence
    from shared.tiny import resolve_model

    torch.set_num_threads(args.engine_threads)
    device = torch.device("cpu")
    model = load_decoder(resolve_model("tiny"), torch.float32, device)
    engine, max_model_len = build_engine_for(model, DecoderConfig.load([]), device)
    rng = random.Random(args.seed)
    num_tokens = parse_range(args.max_tokens)[1]
    rates, step_times = [], []
    for wave in range(1 + max(1, args.requests // max(1, args.concurrency))):
        sampling = [SamplingParams(max_tokens=num_tokens, temperature=args.temperature, seed=i)
                    for i in range(args.concurrency)]
        seqs = [Sequence(f"w{wave}-{i}", [1] + [rng.randrange(1000, 100000) for _ in range(31)], 32, sampling[i],
                         max_model_len, i) for i in range(args.concurrency)]
        for seq in seqs:
            engine.add(seq, lambda output: None)
        started, steps = time.perf_counter(), 0
        while not all(seq.is_finished for seq in seqs):
            engine.step()
            steps += 1
        seconds = time.perf_counter() - started
        if wave:   # the first wave warms up
            rates.append(sum(seq.num_output_tokens for seq in seqs) / seconds)
            step_times.append(seconds / steps)
    return {"engine_tokens_per_s": statistics.median(rates), "engine_step_ms": 1000 * statistics.median(step_times),
            "concurrency": args.concurrency, "max_tokens": num_tokens, "temperature": args.temperature}


# -- the stack ----------------------------------------------------------------------------------------------------
