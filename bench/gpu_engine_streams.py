"""The engine alone under the goodput benchmark's text-256 load: the ceiling of the stack's tokens/s at 256 streams.

    python -m bench.gpu_engine_streams                       # $OUT/engine_streams.json
    python -m bench.gpu_engine_streams --callers 256 --tokens 256 --requests-per-caller 3
    python -m bench.gpu_engine_streams --quantization fp8 --kv-cache-dtype fp8   # FP8 weights and KV cache
    python -m bench.gpu_engine_streams --kernels             # and the 256-row graph's kernels by name
    python -m bench.gpu_engine_streams --device cpu --callers 4 --tokens 8   # the tiny model: a check of the script

Full Pixtral-12B shape, random bf16 weights, one CUDA GPU, the decoder's defaults on CUDA (CUDA graphs, the host's
work overlapping the GPU's) with `--max-num-seqs` = callers. Closed loop in this process, without gRPC, gateway or
detokenizer: `--callers` callers, each sending its next request (a 24-token text prompt of random ids, greedy,
`--tokens` new tokens) as soon as its last one ends, `--requests-per-caller` requests each. Requests are added to
the engine from its own sinks, as the service's would arrive between steps. Reports tokens/s, steps/s, tokens a
step, the time to first token (from the request's arrival at the engine) at p50/p99, and on CUDA the GPU time of
a replay of the largest decode graph (`graph_replay_ms`).
"""

from __future__ import annotations

import argparse
import itertools
import random
import time

import torch

from bench.common import gpu_name, percentile, save, sync
from bench.gpu_decoder import run_until
from services.decoder.config import DecoderConfig
from services.decoder.factory import build_engine_for
from services.decoder.model import TextModelSpec
from services.decoder.sequence import SamplingParams, Sequence
from services.decoder.weights import load_decoder, quantize_decoder, random_decoder
from shared.tiny import pixtral_12b_config, resolve_model

PROMPT_TOKENS = 24


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--requests-per-caller", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=16, help="requests run first, not counted")
    parser.add_argument("--device", default="cuda", help="cuda: the 12B shape; cpu: the built-in tiny model")
    parser.add_argument("--quantization", default="", help="fp8: the decoder's --quantization")
    parser.add_argument("--kv-cache-dtype", default="auto", help="fp8: the decoder's --kv-cache-dtype")
    parser.add_argument("--kernels", action="store_true", help="CUDA: the largest decode graph's kernels, by name "
                                                               "(torch.profiler), in the results")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        spec = TextModelSpec.from_config(pixtral_12b_config())
        model = random_decoder(spec, torch.bfloat16, device, seed=0)
        if args.quantization:
            model = quantize_decoder(model)
    else:
        model = load_decoder(resolve_model("tiny"), torch.float32, device)
        spec = model.spec
    config = DecoderConfig.load(["--device", args.device, "--max-num-seqs", str(args.callers),
                                 "--kv-cache-dtype", args.kv_cache_dtype]
                                + (["--quantization", args.quantization] if args.quantization else []))
    engine, max_model_len = build_engine_for(model, config, device)
    rng = random.Random(0)
    arrivals: dict[str, float] = {}
    firsts: list[float] = []
    done: list = []
    left = {"requests": 0}   # requests still to send, the callers' together
    indexes = itertools.count()

    def submit() -> None:
        index = next(indexes)
        ids = [1] + [rng.randrange(1000, spec.vocab_size) for _ in range(PROMPT_TOKENS - 1)]
        seq = Sequence(f"r{index}", ids, len(ids), SamplingParams(args.tokens, temperature=0.0), max_model_len,
                       index)
        arrivals[seq.request_id] = time.perf_counter()
        engine.add(seq, sink)
        left["requests"] -= 1

    def sink(output) -> None:
        started = arrivals.pop(output.request_id, None)
        if started is not None and output.token_ids:
            firsts.append(time.perf_counter() - started)
        if output.finish_reason is not None:
            done.append(output)
            if left["requests"] > 0:
                submit()   # this caller's next request

    # warm-up: a few requests through every path (prefill, mixed steps, graphs), not counted
    left["requests"] = args.warmup
    for _ in range(args.warmup):
        submit()
    run_until(engine, lambda: len(done) >= args.warmup)
    done.clear()
    firsts.clear()
    num_requests = args.callers * args.requests_per_caller
    left["requests"] = num_requests
    steps_before, tokens_before = engine.counters.num_steps, engine.counters.num_generated_tokens
    if device.type == "cuda":
        sync()
    started = time.perf_counter()
    for _ in range(args.callers):
        submit()
    run_until(engine, lambda: len(done) >= num_requests)
    seconds = time.perf_counter() - started
    num_steps = engine.counters.num_steps - steps_before
    num_tokens = engine.counters.num_generated_tokens - tokens_before
    results = {"device": gpu_name(), "quantization": args.quantization or "none",
               "kv_cache_dtype": args.kv_cache_dtype, "callers": args.callers, "tokens": args.tokens,
               "requests": num_requests,
               "seconds": seconds, "tokens_per_s": num_tokens / seconds, "steps_per_s": num_steps / seconds,
               "tokens_per_step": num_tokens / num_steps,
               "ttft_p50_ms": 1000 * percentile(firsts, 0.5), "ttft_p99_ms": 1000 * percentile(firsts, 0.99)}
    if engine.runner.graphs is not None:
        results["graph_replay_ms"] = replay_ms(engine.runner.graphs)
        if args.kernels:
            from bench.gpu_profile import kernel_table
            graphs = engine.runner.graphs
            results["graph_kernels"] = kernel_table(graphs.graphs[graphs.sizes[-1]].replay, repeats=5)
    print(results, flush=True)
    save("engine_streams", results)


def replay_ms(graphs, repeats: int = 20) -> float:
    """GPU time of the largest decode graph replayed over its last inputs (the run's last step: each row's
    context as it was then): what a full step costs the device, against the run's time per step."""
    graph = graphs.graphs[graphs.sizes[-1]]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


if __name__ == "__main__":
    main()
