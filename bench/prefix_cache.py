"""The decoder's prefix cache: time to first token of a 1024x1024 image prompt prefilled whole, and of the same
image with another question (the image's KV reused), on the engine in this process.

    python -m bench.prefix_cache                  # CPU, the tiny model
    python -m bench.prefix_cache --device cuda    # the full Pixtral-12B shape, random bf16 weights

Prompts are Pixtral's layout built directly (no tokenizer): [BOS][INST], the image's 64 rows of 64 [IMG] tokens
each ended by [IMG_BREAK] ([IMG_END] after the last), ~32 text tokens, [/INST]; the image features are random.
Each round takes an image the engine has not seen (a new sha256): its first prompt is prefilled whole, then the
same image comes back with another question. Results: $OUT/prefix_cache.json.
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
from services.decoder.model import TextModelSpec, load_decoder, random_decoder
from services.decoder.model_runner import ImageInputs
from services.decoder.sequence import SamplingParams, Sequence
from shared.tiny import pixtral_12b_config, resolve_model

BOS, INST, END_INST, IMG, IMG_BREAK, IMG_END = 1, 3, 4, 10, 12, 13
ROWS = COLUMNS = 64   # a 1024x1024 image: 4,096 features


def image_prompt(question_seed: int) -> list[int]:
    rng = random.Random(question_seed)
    image = [token for row in range(ROWS) for token in [IMG] * COLUMNS + [IMG_BREAK if row < ROWS - 1 else IMG_END]]
    return [BOS, INST, *image, *(rng.randrange(1000, 130000) for _ in range(32)), END_INST]


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
        flags = ["--device", "cuda", "--max-num-seqs", "8"]
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
            ids = image_prompt(1000 * round_ + question)
            positions = torch.nonzero(torch.tensor(ids) == IMG).flatten()
            seq = Sequence(f"r{round_}-{question}", ids, len(ids), SamplingParams(1), 100_000, 0,
                           images=ImageInputs(features, positions),
                           image_spans=((int(positions[0]), int(positions[-1]) + 1, sha256),))
            seconds = time_to_first_token(engine, seq)
            if round_ >= 0:
                times.append(seconds)
    stats = engine.stats()
    results = {"device": gpu_name() if device.type == "cuda" else "cpu", "prompt_tokens": len(image_prompt(0)),
               "ttft_whole_prefill_ms": 1000 * statistics.median(cold),
               "ttft_image_kv_reused_ms": 1000 * statistics.median(reused),
               "prefix_hit_tokens": stats.num_prefix_hit_tokens, "rounds": args.rounds}
    results["speedup"] = results["ttft_whole_prefill_ms"] / results["ttft_image_kv_reused_ms"]
    save("prefix_cache", results)


if __name__ == "__main__":
    main()
