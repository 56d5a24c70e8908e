"""Structured output inside a batch: 32 streams decoding, half of them under a JSON schema, against 32 free streams,
in one run (the engine in-process, full Pixtral-12B shape, random bf16 weights; asynchronous scheduling on).

    python -m bench.gpu_structured            # results in $OUT/structured.json
    python -m bench.gpu_structured --tiny     # the same code on the CPU with the tiny model (a check, no figures)

Each stream's time per output token is its decode time over its tokens, after the prompts are prefilled. The
schema's one string field is unbounded, so the constrained streams keep going for the whole measurement (random
weights rarely close a string), each of their tokens masked by the grammar.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.common import gpu_name, image_prompt, save, sync
from bench.gpu_decoder import run_until, sequence
from services.decoder.config import DecoderConfig
from services.decoder.factory import build_engine_for
from services.decoder.model import TextModelSpec
from services.decoder.weights import random_decoder
from shared.sampling import SamplingParams
from shared.structured_output import FormatCompiler, ResponseFormat
from shared.tiny import pixtral_12b_config, tiny_config
from shared.tokenizer import load_tokenizer

SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}, "done": {"type": "boolean"}},
          "required": ["story", "done"]}


def measure(engine, prompts, features, compiled, num_constrained: int, steps: int, tag: str) -> dict:
    seqs = []
    for index, prompt in enumerate(prompts):
        seq = sequence(hash((tag, index)) % 10**9, prompt, 10_000, features)
        seq.sampling = SamplingParams(10_000, temperature=1.0, seed=index)
        if index < num_constrained:
            seq.constraint = compiled.matcher()
        seqs.append(seq)
        engine.add(seq, lambda output: None)
    run_until(engine, lambda: all(s.num_output_tokens >= 2 for s in seqs))
    before = [s.num_output_tokens for s in seqs]
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    elapsed = time.perf_counter() - started
    tpot = [1000 * elapsed / max(1, s.num_output_tokens - b) for s, b in zip(seqs, before)]
    for s in seqs:
        engine.abort(s.request_id)
    engine.step()
    constrained, free = tpot[:num_constrained], tpot[num_constrained:]
    return {"free_tpot_ms": statistics.median(free) if free else None,
            "constrained_tpot_ms": statistics.median(constrained) if constrained else None,
            "constrained_finished": sum(s.is_finished and s.finish_reason.value == "stop" for s in seqs[:num_constrained])}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    spec = TextModelSpec.from_config(tiny_config() if args.tiny else pixtral_12b_config())
    model = random_decoder(spec, dtype, device, seed=0)
    config = DecoderConfig.load(["--device", device.type, "--max-num-seqs", "64", "--enable-prefix-caching",
                                 "false"])
    engine, _ = build_engine_for(model, config, device)
    engine.overlap = True
    compiled = FormatCompiler(load_tokenizer()).compile(ResponseFormat("json_schema", json.dumps(SCHEMA)))
    prompts = [image_prompt(512, 512, seed=100 + i) for i in range(32)]
    features = torch.randn(1024, spec.vision_hidden_size, device=device, dtype=dtype)
    steps = 8 if args.tiny else 128
    results = {"device": gpu_name() if device.type == "cuda" else "cpu", "streams": 32, "steps": steps}
    # free, mixed, free again: the two free runs bound the noise of the comparison
    for tag, num_constrained in (("free", 0), ("mixed", 16), ("free_again", 0), ("mixed_again", 16)):
        results.update({f"{tag}_{key}": value for key, value in measure(
            engine, prompts, features, compiled, num_constrained, steps, tag).items()})
    free = statistics.mean([results["free_free_tpot_ms"], results["free_again_free_tpot_ms"]])
    results["mixed_free_over_all_free"] = statistics.mean(
        [results["mixed_free_tpot_ms"], results["mixed_again_free_tpot_ms"]]) / free
    results["mixed_constrained_over_all_free"] = statistics.mean(
        [results["mixed_constrained_tpot_ms"], results["mixed_again_constrained_tpot_ms"]]) / free
    engine.stop()
    save("structured_tiny" if args.tiny else "structured", results)


if __name__ == "__main__":
    main()
