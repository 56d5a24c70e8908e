"""The decoder's prefix cache: time to first token of a 1024x1024 image prompt prefilled whole, and of the same
image with another question (the image's KV reused), on the engine in this process.

    python -m bench.prefix_cache                  # CPU, the tiny model
    python -m bench.prefix_cache --device cuda    # the full Pixtral-12B shape, random bf16 weights

Prompts are Pixtral's layout built directly (no tokenizer): [BOS][INST], the image's 64 rows of 64 [IMG] tokens
each ended by [IMG_BREAK] ([IMG_END] after the last), ~32 text tokens, [/INST]; the image features are random.
Each round takes an image the engine has not seen (a new sha256): its first prompt is prefilled whole, then the
same image comes back with another question. Then the cost of the cache's bookkeeping when nothing is shared:
decode tokens/s of 1 and 32 streams (each its own 512x512 image) with the cache on and off, in the same engine.
Results: $OUT/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from bench.common import gpu_name, save, sync
from services.decoder.config import DecoderConfig
from services.decoder.factory import build_engine_for
from services.decoder.model import TextModelSpec
from services.decoder.weights import load_decoder, random_decoder
from services.decoder.step_inputs import ImageInputs
from services.decoder.sequence import SamplingParams, Sequence
from shared.tiny import pixtral_12b_config, resolve_model

BOS, INST, END_INST, IMG, IMG_BREAK, IMG_END = 1, 3, 4, 10, 12, 13
ROWS = COLUMNS = 64   # a 1024x1024 image: 4,096 features


def image_prompt(question_seed: int, rows: int = ROWS, columns: int = COLUMNS) -> list[int]:
    rng = random.Random(question_seed)
    image = [token for row in range(rows) for token in [IMG] * columns + [IMG_BREAK if row < rows - 1 else IMG_END]]
    return [BOS, INST, *image, *(rng.randrange(1000, 130000) for _ in range(32)), END_INST]


def image_sequence(request_id: str, ids: list[int], features: torch.Tensor, sha256: str, max_tokens: int) -> Sequence:
    positions = torch.nonzero(torch.tensor(ids) == IMG).flatten()
    return Sequence(request_id, ids, len(ids), SamplingParams(max_tokens), 100_000, 0,
                    images=ImageInputs(features[:len(positions)], positions),
                    image_spans=((int(positions[0]), int(positions[-1]) + 1, sha256),))


def decode_tokens_per_s(engine, features: torch.Tensor, num_streams: int, tag: str, steps: int = 64) -> float:
    """Decode rate of `num_streams` sequences, each with a 512x512 image of its own (nothing to share)."""
    seqs = [image_sequence(f"{tag}-{i}", image_prompt(i, 32, 32), features, f"{tag}-{i}".rjust(64, "0"), 10_000)
            for i in range(num_streams)]
    for seq in seqs:
        engine.add(seq, lambda output: None)
    while not all(seq.num_output_tokens >= 2 for seq in seqs):
        engine.step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    rate = num_streams * steps / (time.perf_counter() - started)
    for seq in seqs:
        engine.abort(seq.request_id)
    engine.step()
    return rate


def time_to_first_token(engine, seq: Sequence) -> float:
    sync()
    started = time.perf_counter()
    engine.add(seq, lambda output: None)
    while not seq.is_finished:
        engine.step()
    sync()
    return time.perf_counter() - started


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        model = random_decoder(TextModelSpec.from_config(pixtral_12b_config()), torch.bfloat16, device)
        flags = ["--device", "cuda", "--max-num-seqs", "32"]
    else:
        model = load_decoder(resolve_model("tiny"), torch.float32, device)
        flags = []
    engine, _ = build_engine_for(model, DecoderConfig.load(flags), device)
    dtype = model.embed_tokens.weight.dtype
    cold, reused = [], []
    for round_ in range(-1, args.rounds):   # round -1 warms up
        features = torch.randn(ROWS * COLUMNS, model.spec.vision_hidden_size, dtype=dtype, device=device)
        sha256 = f"{round_ + 1:064x}"
        for question, times in ((0, cold), (1, reused)):
            seq = image_sequence(f"r{round_}-{question}", image_prompt(1000 * round_ + question), features, sha256, 1)
            seconds = time_to_first_token(engine, seq)
            if round_ >= 0:
                times.append(seconds)
    stats = engine.stats()
    results = {"device": gpu_name() if device.type == "cuda" else "cpu", "prompt_tokens": len(image_prompt(0)),
               "ttft_whole_prefill_ms": 1000 * statistics.median(cold),
               "ttft_image_kv_reused_ms": 1000 * statistics.median(reused),
               "prefix_hit_tokens": stats.num_prefix_hit_tokens, "rounds": args.rounds}
    results["speedup"] = results["ttft_whole_prefill_ms"] / results["ttft_image_kv_reused_ms"]
    blocks = engine.scheduler.block_manager
    for num_streams in (1, 32):
        for is_on in (True, False, True):   # on, off, on again: the spread of the "on" runs shows the noise
            blocks.enable_prefix_caching = is_on
            rate = decode_tokens_per_s(engine, features, num_streams, f"d{num_streams}{is_on}{time.time_ns()}")
            results.setdefault(f"decode_b{num_streams}_tok_s_cache_{'on' if is_on else 'off'}", []).append(rate)
    save("prefix_cache", results)


if __name__ == "__main__":
    main()
