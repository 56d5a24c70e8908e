"""FP8 (e4m3) against bf16 in one run: the engine in bf16, with FP8 weights, and with FP8 weights and an FP8 KV
cache, on the same random weights of the full Pixtral-12B shape; transformers' generate beside them; the numerics
of each against bf16.

    python -m bench.gpu_fp8                 # results in $OUT/fp8.json and on stderr
    python -m bench.gpu_fp8 --tiny          # the same code on the CPU with the tiny model (a check, no figures)

Measures for each variant: decode tokens/s at batch 1 (a 1024x1024 image prompt) and with 32 and 64 streams
(512x512 image prompts, prefill excluded), time to first token of a 1024x1024 image + ~32 text tokens with the
image features in hand, the prefill of 32 prompts of 1,079 tokens at once, weight bytes and KV-cache tokens; and
against bf16, over the last positions of a 1,079-token prompt prefilled at once: the relative error of the logits
and the KL divergence of the next-token distribution at the output and, through the final norm and LM head, after
each layer ("logit lens").
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from bench.common import gpu_name, image_prompt, save, sync, timed
from bench.gpu_decoder import convert, decode_rate, hf_model, pixel_batch, run_until, sequence, start_streams
from services.decoder.config import DecoderConfig
from services.decoder.factory import GIB, build_engine_for
from services.decoder.model import TextModelSpec
from services.decoder.weights import quantize_decoder, random_decoder
from shared.tiny import pixtral_12b_config, tiny_config

VARIANTS = (("bf16", None, "auto"), ("fp8", "fp8", "auto"), ("fp8_kv", "fp8", "fp8"))


@torch.inference_mode()
def hf_decode(model, prompt_1024, device) -> dict:
    ids, images = prompt_1024
    pixels, sizes = pixel_batch(images)
    input_ids = torch.tensor([ids], device=device)

    def generate(new_tokens):
        return model.generate(input_ids=input_ids, pixel_values=pixels, image_sizes=sizes, do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    ttft = timed(lambda: generate(1), repeats=2)
    return {"hf_ttft_1024_ms": 1000 * ttft,
            "hf_decode_b1_tok_s": 32 / (timed(lambda: generate(33), repeats=1, warmup=0) - ttft)}


def engine_config(quantization, kv_dtype, device) -> DecoderConfig:
    flags = ["--device", device.type, "--max-num-seqs", "64", "--max-num-batched-tokens", "8192",
             "--enable-prefix-caching", "false", "--kv-cache-dtype", kv_dtype]
    return DecoderConfig.load(flags + (["--quantization", quantization] if quantization else []))


@torch.inference_mode()
def engine_figures(model, config, prompt_1024, prompts_512, features, device, decode_steps: int) -> dict:
    results = {}
    started = time.perf_counter()
    engine, _ = build_engine_for(model, config, device)
    results["engine_build_s"] = time.perf_counter() - started
    cache = engine.runner.cache
    results["weights_gib"] = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / GIB
    results["kv_cache_gib"] = cache.num_bytes / GIB
    results["kv_cache_tokens"] = cache.num_blocks * cache.block_size
    results["kv_bytes_per_token"] = cache.num_bytes / results["kv_cache_tokens"]
    # each FP8 weight's skinny kernel as measured at start-up: launches, rows up to which it beats W8A8, and the
    # bandwidth it reads the weight at, by rows
    results["fp8_skinny"] = {
        f"{n}x{k}": {"max_rows": plan.max_rows, "launches": plan.launches,
                     "tb_s": {rows: round(n * k / (ms * 1e9), 2) for rows, ms in plan.times_ms.items()}}
        for (n, k), plan in getattr(engine.runner.ops, "fp8_skinny", {}).items()}

    def first_token(index=[0]):
        index[0] += 1
        seq = sequence(1000 + index[0], prompt_1024, 1, features)
        engine.add(seq, lambda output: None)
        run_until(engine, lambda: seq.is_finished)
    results["ttft_1024_ms"] = 1000 * timed(first_token, repeats=5)

    seq = sequence(0, prompt_1024, 10_000, features)
    engine.add(seq, lambda output: None)
    run_until(engine, lambda: seq.num_output_tokens >= 4)
    results["decode_b1_tok_s"] = decode_rate(engine, 1, decode_steps)
    engine.abort(seq.request_id)
    engine.step()

    for batch in (32, 64):
        seqs, prefill_s = start_streams(engine, 100 * batch, prompts_512[:batch], features)
        if batch == 32:
            results["prefill_32x1079_first_s"] = prefill_s
        run_until(engine, lambda: all(s.num_output_tokens >= 3 for s in seqs))
        results[f"decode_b{batch}_tok_s"] = decode_rate(engine, batch, decode_steps // 2)
        for s in seqs:
            engine.abort(s.request_id)
        engine.step()
    seqs = [sequence(300 + i, prompts_512[i], 1, features) for i in range(32)]
    sync()
    started = time.perf_counter()
    for s in seqs:
        engine.add(s, lambda output: None)
    run_until(engine, lambda: all(s.is_finished for s in seqs))
    results["prefill_32x1079_s"] = time.perf_counter() - started
    numerics = layer_outputs(engine, model, prompts_512[0], features)
    engine.stop()
    return results, numerics


@torch.inference_mode()
def layer_outputs(engine, model, prompt, features, num_positions: int = 128) -> dict:
    """The residual stream after each layer and the logits, at the prompt's last positions, of one prefill."""
    captured = {}

    def hook(index):
        def keep(module, inputs, output):
            x, residual = output
            captured[index] = (x + residual)[-num_positions:]
        return keep
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.layers)]
    try:
        seq = sequence(9000, prompt, 1, features)
        engine.add(seq, lambda output: None)
        run_until(engine, lambda: seq.is_finished)
    finally:
        for handle in handles:
            handle.remove()
    ops = engine.runner.ops
    lens = []
    for index in range(len(model.layers)):   # kept on the host: the next variant's KV cache is sized from the GPU's
        normed, _ = ops.add_rms_norm(captured[index], model.norm.weight, model.norm.eps)
        lens.append(ops.linear(normed, model.lm_head.weight).float().cpu())
    return {"streams": [captured[i].float().cpu() for i in range(len(model.layers))], "logits": lens}


def compare(reference: dict, other: dict) -> dict:
    """Relative error of the residual streams and logits, KL(bf16 || other) of the next-token distributions."""
    def kl(p_logits, q_logits):
        p = p_logits.log_softmax(-1)
        return float((p.exp() * (p - q_logits.log_softmax(-1))).sum(-1).mean())

    def relative(a, b):
        return float((b - a).norm(dim=-1).div(a.norm(dim=-1)).mean())
    layers = [{"layer": i, "stream_relative_error": relative(a, b), "logit_lens_kl": kl(la, lb)}
              for i, (a, b, la, lb) in enumerate(zip(reference["streams"], other["streams"], reference["logits"],
                                                     other["logits"]))]
    last_ref, last = reference["logits"][-1], other["logits"][-1]
    return {"logits_relative_error": relative(last_ref, last), "output_kl": kl(last_ref, last),
            "top1_agreement": float((last_ref.argmax(-1) == last.argmax(-1)).float().mean()),
            "max_layer_stream_relative_error": max(entry["stream_relative_error"] for entry in layers),
            "layers": layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: checks the code, no figures")
    parser.add_argument("--no-hf", action="store_true", help="leave transformers' generate out")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    config = tiny_config() if args.tiny else pixtral_12b_config()
    spec = TextModelSpec.from_config(config)
    prompt_1024 = image_prompt(1024, 1024, seed=1)
    prompts_512 = [image_prompt(512, 512, seed=100 + i) for i in range(64)]
    results = {"device": gpu_name() if device.type == "cuda" else "cpu", "prompt_1024_tokens": len(prompt_1024[0]),
               "prompt_512_tokens": len(prompts_512[0][0])}
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.no_hf or args.tiny:
        model = random_decoder(spec, dtype, device, seed=0)
    else:
        hf = hf_model(config)
        try:
            results.update(hf_decode(hf, prompt_1024, device))
        except Exception as error:  # noqa: BLE001 - still measure ours
            results["hf_error"] = repr(error)[:300]
        model = convert(hf)
        del hf
        gc.collect()
        torch.cuda.empty_cache()
    features = torch.randn(4096, spec.vision_hidden_size, device=device, dtype=dtype)
    numerics = {}
    for name, quantization, kv_dtype in VARIANTS:
        if quantization and isinstance(model.layers[0].mlp.down_proj.weight, torch.Tensor):
            model = quantize_decoder(model)   # in place, once: the bf16 variant is measured first
        figures, numerics[name] = engine_figures(model, engine_config(quantization, kv_dtype, device), prompt_1024,
                                                 prompts_512, features, device, decode_steps=8 if args.tiny else 128)
        results.update({f"{name}_{key}": value for key, value in figures.items()})
        save("fp8_partial", results)   # what a run cut short leaves
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name in ("fp8", "fp8_kv"):
        comparison = compare(numerics["bf16"], numerics[name])
        results[f"{name}_numerics_layers"] = comparison.pop("layers")
        results.update({f"{name}_{key}": value for key, value in comparison.items()})
    results["fp8_decode_b1_over_bf16"] = results["fp8_decode_b1_tok_s"] / results["bf16_decode_b1_tok_s"]
    results["fp8_kv_tokens_over_bf16"] = results["fp8_kv_kv_cache_tokens"] / results["bf16_kv_cache_tokens"]
    save("fp8_tiny" if args.tiny else "fp8", results)


if __name__ == "__main__":
    main()
