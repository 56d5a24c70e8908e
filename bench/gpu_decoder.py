"""Decoder engine vs transformers' generate, full Pixtral-12B shape, random bf16 weights, one CUDA GPU.

Both run the same weights (ours are converted from the transformers model) and the same mistral-common prompts.

    python -m bench.gpu_decoder                  # results in $OUT/decoder.json and on stderr
    python -m bench.gpu_decoder --engine-only    # our engine alone: $OUT/decoder_engine_only.json
    python -m bench.gpu_decoder --engine-only --top-p 0.9   # the same sampling at temperature 0.8, top-p 0.9

Decode rates are measured with the engine's asynchronous scheduling on (the default on CUDA) and off
(`*_read_each_step_*`: the host reads each step's tokens before it launches the next), in the same run.

Measures: decode tokens/s at batch 1 (one 1024x1024 image prompt), decode tokens/s with 32 and 64 streams
(512x512 image prompts, prefill excluded), time to first token of a 1024x1024 image + ~32 text tokens with the
image features already computed, a wave of 32 requests x 128 tokens in-process (prefill included), memory.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from bench.common import gpu_name, image_prompt, save, sync, timed
from services.decoder.config import DecoderConfig
from services.decoder.engine import Engine
from services.decoder.factory import GIB, build_engine_for
from services.decoder.model import PixtralDecoder, TextModelSpec
from services.decoder.weights import decoder_from_tensors, random_decoder
from services.decoder.step_inputs import ImageInputs
from services.decoder.sequence import SamplingParams, Sequence
from shared import checkpoint
from shared.tiny import pixtral_12b_config

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
# (engine.overlap, result-name suffix): the host reads each step's tokens before the next, then overlapped
SCHEDULING_MODES = ((False, "_read_each_step"), (True, ""))


def hf_model(config):
    from transformers import LlavaForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlavaForConditionalGeneration._from_config(config, dtype=DTYPE, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def pixel_batch(images):
    pixels = torch.stack([torch.from_numpy(image) for image in images]).to(DEVICE, DTYPE)
    sizes = torch.tensor([list(image.shape[1:]) for image in images], device=DEVICE)
    return pixels, sizes


@torch.inference_mode()
def hf_anchors(model, prompt_1024, prompts_512) -> dict:
    results = {}
    ids, images = prompt_1024
    pixels, sizes = pixel_batch(images)
    input_ids = torch.tensor([ids], device=DEVICE)

    def generate(new_tokens, input_ids=input_ids, pixels=pixels, sizes=sizes):
        return model.generate(input_ids=input_ids, pixel_values=pixels, image_sizes=sizes, do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    results["hf_vision_1024_ms"] = 1000 * timed(lambda: model.model.get_image_features(
        pixel_values=pixels, image_sizes=sizes), repeats=10)
    results["hf_ttft_1024_ms"] = 1000 * timed(lambda: generate(1), repeats=3)
    t_33 = timed(lambda: generate(33), repeats=1, warmup=0)
    results["hf_decode_b1_tok_s"] = 32 / (t_33 - results["hf_ttft_1024_ms"] / 1000)
    results["hf_greedy_1024"] = generate(16)[0, len(ids):].tolist()
    # the image's features before the projector, for our decoder to run the same prompt
    results["features_1024"] = model.model.vision_tower(pixels, image_sizes=sizes).last_hidden_state[0]

    batch_ids = torch.tensor([p[0] for p in prompts_512[:32]], device=DEVICE)
    batch_pixels, batch_sizes = pixel_batch([p[1][0] for p in prompts_512[:32]])
    t_1 = timed(lambda: generate(1, batch_ids, batch_pixels, batch_sizes), repeats=1)
    t_9 = timed(lambda: generate(9, batch_ids, batch_pixels, batch_sizes), repeats=1, warmup=0)
    results["hf_decode_b32_tok_s"] = 32 * 8 / (t_9 - t_1)
    t_wave = timed(lambda: generate(128, batch_ids, batch_pixels, batch_sizes), repeats=1, warmup=0)
    results["hf_wave_32x128_tok_s"] = 32 * 128 / t_wave
    return results


def convert(model) -> PixtralDecoder:
    """Our decoder with the transformers model's weights (q/k/v and gate/up concatenated: a copy)."""
    state = model.state_dict()
    text = {new: state[k] for k in state if (new := checkpoint.part_renamer("language_model")(k))}
    projector = {new: state[k] for k in state if (new := checkpoint.part_renamer("projector")(k))}
    spec = TextModelSpec.from_config(model.config)
    return decoder_from_tensors(spec, text, projector, DEVICE)


# every sequence's generation controls: greedy, or --top-p's sampling
SAMPLING: dict[str, float] = {}


def sequence(index: int, prompt, max_tokens: int, features: torch.Tensor) -> Sequence:
    ids, _ = prompt
    positions = torch.nonzero(torch.tensor(ids) == 10).flatten()
    params = SamplingParams(max_tokens, **SAMPLING, seed=index)
    return Sequence(f"r{index}", list(ids), len(ids), params, 100_000, index,
                    ImageInputs(features[:len(positions)], positions))


def run_until(engine: Engine, condition) -> None:
    while not condition():
        engine.step()


def decode_rate(engine: Engine, num_rows: int, num_steps: int) -> float:
    """Tokens/s of `num_steps` steps of the `num_rows` sequences running (their prefill done)."""
    sync()
    started = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    return num_rows * num_steps / (time.perf_counter() - started)


def start_streams(engine: Engine, first_index: int, prompts, features: torch.Tensor) -> tuple[list[Sequence], float]:
    """One long sequence per prompt, added at once and run until each has its first token -> (the sequences,
    seconds their prefill took)."""
    seqs = [sequence(first_index + i, prompt, 10_000, features) for i, prompt in enumerate(prompts)]
    for seq in seqs:
        engine.add(seq, lambda output: None)
    sync()
    started = time.perf_counter()
    run_until(engine, lambda: all(seq.num_output_tokens >= 1 for seq in seqs))
    return seqs, time.perf_counter() - started


@torch.inference_mode()
def ours(model, prompt_1024, prompts_512, features_1024: torch.Tensor) -> dict:
    results = {}
    config = DecoderConfig.load(["--device", "cuda", "--max-num-seqs", "64", "--max-num-batched-tokens", "8192"])
    started = time.perf_counter()
    engine, max_model_len = build_engine_for(model, config, DEVICE)
    results["engine_build_and_graph_capture_s"] = time.perf_counter() - started
    cache = engine.runner.cache
    spec = model.spec
    results["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    results["kv_cache_gib"] = cache.num_bytes / GIB
    results["kv_cache_tokens"] = cache.num_blocks * cache.block_size
    results["kv_bytes_per_token"] = cache.num_bytes // results["kv_cache_tokens"]
    results["max_concurrent_4k_sequences"] = min(results["kv_cache_tokens"] // 4096, config.max_num_seqs)
    features = torch.randn(4096, spec.vision_hidden_size, device=DEVICE, dtype=DTYPE)
    graphs = engine.runner.graphs
    for size in (1, 32, 64):  # the GPU time of one decode step alone: the rest of a step is host work
        results[f"graph_replay_b{size}_ms"] = 1000 * timed(graphs.graphs[size].replay, repeats=50, warmup=5)

    # time to first token with the image features in hand (what a cached embedding gives the decoder)
    def first_token(index=[0]):
        index[0] += 1
        seq = sequence(1000 + index[0], prompt_1024, 1, features)
        engine.add(seq, lambda output: None)
        run_until(engine, lambda: seq.is_finished)
    results["ttft_1024_engine_ms"] = 1000 * timed(first_token, repeats=5)

    # the same with a prompt length never seen before each time, as a service sees them
    def first_token_new_length(index=[0]):
        index[0] += 1
        ids, images = prompt_1024
        seq = sequence(2000 + index[0], (ids + [1000 + index[0]] * (3 * index[0]), images), 1, features)
        engine.add(seq, lambda output: None)
        run_until(engine, lambda: seq.is_finished)
    results["ttft_1024_engine_new_lengths_ms"] = 1000 * timed(first_token_new_length, repeats=5)

    seq = sequence(0, prompt_1024, 10_000, features_1024)
    engine.add(seq, lambda output: None)
    run_until(engine, lambda: seq.num_output_tokens >= 1)
    run_until(engine, lambda: seq.num_output_tokens >= 16)
    results["greedy_1024"] = seq.output_token_ids[:16]
    for overlap, name in SCHEDULING_MODES:
        engine.overlap = overlap
        engine.step()
        results[f"decode_b1{name}_tok_s"] = decode_rate(engine, 1, 128)
    engine.abort(seq.request_id)
    engine.step()

    for batch in (32, 64):
        seqs, results[f"prefill_{batch}x{len(prompts_512[0][0])}_s"] = start_streams(
            engine, 100 * batch, prompts_512[:batch], features)
        for overlap, name in SCHEDULING_MODES:
            engine.overlap = overlap
            engine.step()
            results[f"decode_b{batch}{name}_tok_s"] = decode_rate(engine, batch, 64)
        for s in seqs:
            engine.abort(s.request_id)
        engine.step()

    seqs = [sequence(300 + i, prompts_512[i], 1, features) for i in range(32)]   # the 32-stream prefill again
    sync()
    started = time.perf_counter()
    for s in seqs:
        engine.add(s, lambda output: None)
    run_until(engine, lambda: all(s.is_finished for s in seqs))
    results[f"prefill_32x{len(prompts_512[0][0])}_again_s"] = time.perf_counter() - started
    for overlap, name in SCHEDULING_MODES:
        engine.overlap = overlap
        seqs = [sequence(500 + i + 100 * overlap, prompts_512[i], 128, features) for i in range(32)]
        sync()
        started = time.perf_counter()
        for s in seqs:
            engine.add(s, lambda output: None)
        run_until(engine, lambda: all(s.is_finished for s in seqs))
        results[f"wave_32x128_in_process{name}_tok_s"] = sum(s.num_output_tokens for s in seqs) / (
            time.perf_counter() - started)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-only", action="store_true",
                        help="our engine alone on random weights, without transformers' anchors (a minute, not ten); "
                             "results in $OUT/decoder_engine_only.json")
    parser.add_argument("--top-p", type=float, default=0.0,
                        help="sample at temperature 0.8 with this top-p instead of greedy decoding (with "
                             "--engine-only: results in $OUT/decoder_engine_only_top_p.json)")
    args = parser.parse_args()
    if args.top_p:
        SAMPLING.update(temperature=0.8, top_p=args.top_p)
    config = pixtral_12b_config()
    prompt_1024 = image_prompt(1024, 1024, seed=1)
    prompts_512 = [image_prompt(512, 512, seed=100 + i) for i in range(64)]
    results = {"device": gpu_name(), "prompt_1024_tokens": len(prompt_1024[0]),
               "prompt_512_tokens": len(prompts_512[0][0])}
    if args.engine_only:
        model = random_decoder(TextModelSpec.from_config(config), DTYPE, DEVICE, seed=0)
        results.update(ours(model, prompt_1024, prompts_512, torch.randn(4096, 1024, device=DEVICE, dtype=DTYPE)))
        results.pop("greedy_1024")
        save("decoder_engine_only_top_p" if args.top_p else "decoder_engine_only", results)
        return
    model = hf_model(config)
    try:
        results.update(hf_anchors(model, prompt_1024, prompts_512))
    except Exception as error:  # noqa: BLE001 - still measure ours
        import traceback
        traceback.print_exc()
        results["hf_error"] = repr(error)[:300]
    features_1024 = results.pop("features_1024", None)
    if features_1024 is None:
        features_1024 = torch.randn(4096, 1024, device=DEVICE, dtype=DTYPE)
        results["hf_greedy_1024"] = []
    decoder = convert(model)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    results.update(ours(decoder, prompt_1024, prompts_512, features_1024))
    ours_greedy, hf_greedy = results.pop("greedy_1024"), results.pop("hf_greedy_1024")
    # bf16 on both sides with different kernels: report how long the greedy outputs stay identical
    results["greedy_1024_common_prefix_of_16"] = next(
        (i for i, (a, b) in enumerate(zip(ours_greedy, hf_greedy)) if a != b), len(ours_greedy))
    save("decoder", results)


if __name__ == "__main__":
    main()
