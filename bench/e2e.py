"""End to end through gRPC: the whole stack started as separate processes (pixtral-serve's launcher).

    python -m bench.e2e --device cuda --model random-12b     # GPU, full Pixtral-12B shape, random bf16 weights
    python -m bench.e2e --device cpu --model tiny --requests 8 --max-tokens 32 --image-size 256

Measures a wave of N concurrent chat requests (each a distinct image + ~32 tokens of text, greedy, max_tokens
new tokens): tokens/s over the wave, time to first token and time per output token percentiles, and where the
wave's time to first token goes (from the roles' logs: until the gateway has the images encoded, until the decoder
has the request, until the first token is back); then the time to first token of a new 1024x1024 image (encoded
on the way), of the same image again (its embedding cached), and of the same image with another question each
time.

`--prefix-caching off` (default) starts the decoders without their prefix cache, so that the repeated image's
time to first token is that of the embedding cache: the whole prompt is prefilled. With `on`, a repeated image's
KV is reused and only the tokens after it are prefilled. `--async-scheduling off` makes the decoders read each
step's tokens before they launch the next (on, the default, overlaps the two on CUDA).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.common import QUESTION, gpu_name, noise_png, percentile, save
from pixtral.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.launcher import Launcher
from services.local_processes import free_port
from services.serve_config import ServeConfig
from shared.checkpoint import RANDOM_WEIGHTS_FILE
from shared.tiny import pixtral_12b_config


def random_12b_dir() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="pixtral-random-12b-"))
    pixtral_12b_config().save_pretrained(str(directory))
    (directory / RANDOM_WEIGHTS_FILE).write_text(json.dumps({"seed": 0}))
    return directory


def request(image: bytes, max_tokens: int, text: str = QUESTION, request_id: str = "") -> gateway_pb2.ChatRequest:
    content = [gateway_pb2.ContentPart(image=gateway_pb2.ImagePart(data=image)), gateway_pb2.ContentPart(text=text)]
    return gateway_pb2.ChatRequest(
        messages=[gateway_pb2.Message(role=gateway_pb2.ROLE_USER, content=content)],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0), request_id=request_id)


async def timed_chat(stub, message) -> dict:
    sent_at = time.time()   # wall clock, as the roles' log lines: for the phases of the wave
    started = time.perf_counter()
    first = None
    tokens = 0
    async for response in stub.Chat(message, timeout=600):
        if response.token_ids and first is None:
            first = time.perf_counter()
        tokens += len(response.token_ids)
    finished = time.perf_counter()
    return {"ttft": first - started, "tokens": tokens, "tpot": (finished - first) / max(1, tokens - 1),
            "usage": response.usage, "request_id": message.request_id, "sent_at": sent_at,
            "first_token_at": sent_at + (first - started)}


def log_entries(path: Path) -> list[dict]:
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue   # grpc's own lines
    return entries


def wave_phases(outcomes: list[dict], log_dir: Path) -> dict:
    """Where each wave request's time to first token went, from the log lines of the request's id: until the
    gateway had its image encoded (its "prompt of ..." line), until the decoder took the call (its "Generate OK in
    t s" line, less t), until the first token was back."""
    ready, taken = {}, {}
    for entry in log_entries(log_dir / "gateway.log"):
        if entry.get("msg", "").startswith("prompt of "):
            ready[entry.get("request_id")] = entry["ts"]
    for path in log_dir.glob("decoder*.log"):
        for entry in log_entries(path):
            words = entry.get("msg", "").split()
            if words[:3] == ["Generate", "OK", "in"]:
                taken[entry.get("request_id")] = entry["ts"] - float(words[3])
    phases: dict[str, list[float]] = {"images": [], "to_decoder": [], "in_decoder": []}
    for outcome in outcomes:
        rid = outcome["request_id"]
        if rid not in ready or rid not in taken:
            continue
        phases["images"].append(ready[rid] - outcome["sent_at"])
        phases["to_decoder"].append(taken[rid] - ready[rid])
        phases["in_decoder"].append(outcome["first_token_at"] - taken[rid])
    results = {"wave_phases_requests": len(phases["images"])}
    for name, values in phases.items():
        if values:
            results[f"wave_{name}_p50_ms"] = 1000 * percentile(values, 0.5)
            results[f"wave_{name}_p90_ms"] = 1000 * percentile(values, 0.9)
    return results


async def measure(gateway: str, args) -> dict:
    results = {}
    options = [("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(gateway, options=options) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        await timed_chat(stub, request(noise_png(64, 64, 999), 4))  # warm-up
        seed = time.time_ns() % (1 << 30)   # images never seen before, even with a Redis that outlived a run
        images = [noise_png(args.image_size, args.image_size, seed + i) for i in range(args.requests)]
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(timed_chat(stub, request(image, args.max_tokens, request_id=f"wave-{i}"))
                                          for i, image in enumerate(images)))
        wall = time.perf_counter() - started
        tokens = sum(o["tokens"] for o in outcomes)
        results.update({
            f"wave_{args.requests}x{args.max_tokens}_tok_s": tokens / wall,
            "wave_tokens": tokens, "wave_seconds": wall,
            "wave_ttft_p50_ms": 1000 * percentile([o["ttft"] for o in outcomes], 0.5),
            "wave_ttft_p99_ms": 1000 * percentile([o["ttft"] for o in outcomes], 0.99),
            "wave_tpot_p50_ms": 1000 * percentile([o["tpot"] for o in outcomes], 0.5),
            "wave_tpot_p99_ms": 1000 * percentile([o["tpot"] for o in outcomes], 0.99),
            "wave_images_encoded": sum(o["usage"].encoded_images for o in outcomes),
            "wave_outcomes": outcomes})
        big = noise_png(1024, 1024, seed - 1)
        first = await timed_chat(stub, request(big, 1))
        repeats = [await timed_chat(stub, request(big, 1)) for _ in range(5)]
        results["ttft_1024_first_ms"] = 1000 * first["ttft"]
        results["ttft_1024_cached_ms"] = 1000 * statistics.median(r["ttft"] for r in repeats)
        results["ttft_repeated_over_first"] = results["ttft_1024_cached_ms"] / results["ttft_1024_first_ms"]
        by_reference = request(big, 1)
        by_reference.messages[0].content[0].image.Clear()
        by_reference.messages[0].content[0].image.sha256 = hashlib.sha256(big).hexdigest()
        repeats = [await timed_chat(stub, by_reference) for _ in range(5)]
        results["ttft_1024_cached_by_sha256_ms"] = 1000 * statistics.median(r["ttft"] for r in repeats)
        assert first["usage"].encoded_images == 1 and all(r["usage"].cached_images == 1 for r in repeats)
        questions = [f"Question {i}: what is in the top left corner of this picture, and what colour is it?"
                     for i in range(5)]
        repeats = [await timed_chat(stub, request(big, 1, question)) for question in questions]
        results["ttft_1024_new_question_ms"] = 1000 * statistics.median(r["ttft"] for r in repeats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help="a checkpoint directory, tiny, or random-12b")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--vision-workers", type=int, default=1)
    parser.add_argument("--decoders", type=int, default=1)
    parser.add_argument("--prefix-caching", choices=("on", "off"), default="off",
                        help="the decoders' prefix cache (off: a repeated image is prefilled again)")
    parser.add_argument("--async-scheduling", choices=("on", "off"), default="on",
                        help="the decoders' overlap of host and device work (CUDA)")
    parser.add_argument("--name", default="e2e")
    parser.add_argument("--log-dir", default="", help="where the roles' logs go (default: a new temporary folder)")
    args = parser.parse_args()
    os.environ["PIXTRAL_ENABLE_PREFIX_CACHING"] = "true" if args.prefix_caching == "on" else "false"
    os.environ["PIXTRAL_ASYNC_SCHEDULING"] = "true" if args.async_scheduling == "on" else "false"
    model = str(random_12b_dir()) if args.model == "random-12b" else args.model
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pixtral-e2e-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    launcher = Launcher(ServeConfig(model=model, device=args.device, vision_workers=args.vision_workers,
                                    decoders=args.decoders, port=free_port()), log_dir=log_dir)
    try:
        started = time.perf_counter()
        gateway = launcher.start()
        results = {"device": gpu_name() if args.device == "cuda" else "cpu", "model": args.model,
                   "prefix_caching": args.prefix_caching, "async_scheduling": args.async_scheduling,
                   "startup_s": time.perf_counter() - started}
        results.update(asyncio.run(measure(gateway, args)))
    finally:
        launcher.stop()
    results.update(wave_phases(results.pop("wave_outcomes"), log_dir))
    print(f"the roles' logs: {log_dir}", file=sys.stderr)
    save(args.name, results)


if __name__ == "__main__":
    main()
