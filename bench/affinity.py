"""Routing by prefix-cache affinity against least-busy: the share of prompt tokens served by the decoders' prefix
caches when most requests repeat an image, both policies in one run over the same decoders.

    python -m bench.affinity                        # CPU, tiny model, two decoders, 90% repeated images
    python -m bench.affinity --kv-cache-gib 0.003   # each decoder's KV cache holds about half the images
    python -m bench.affinity --load-factor 2        # a looser load bound for the affinity gateway
    python -m bench.affinity --load-slack 0         # the load factor's bound alone
    python -m bench.affinity --device cuda --model random-12b --image-size 512   # both decoders on one GPU

One stack (a Redis of its own, one vision worker, two decoders) and two gateways over the same decoders, one with
`--routing affinity`, one with `--routing least-busy`. Each policy gets the same sequence of requests: each asks
about one image (`--image-size`, then ~10 tokens of text, 2 new tokens), a new image with probability
1 - `--repeat`, else one already asked about in that policy's run, chosen uniformly; `--concurrency` callers. The
two runs use different images, so neither finds the other's in a cache; the second run finds the decoders' KV
caches holding the first one's blocks, which are evicted first (least recently used) as it needs room.

Reports per policy: cached prompt tokens over prompt tokens (every request, and the repeats alone, from each
response's usage), the decoders' share of the prompt tokens (their Info), requests the load bound sent away from
their image's decoder, requests/s and time to first token. Results: $OUT/affinity.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import grpc

from bench.common import noise_png, percentile, save
from pixtral.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from shared.tiny import resolve_model
from tests.support import RedisServer, Stack, metric_value

QUESTION = "What is in this picture?"


def workload(num_requests: int, repeat: float, seed: int) -> list[int]:
    """The image index of each request: a new one (the next index) or, with probability `repeat`, one before."""
    rng, indexes, num_images = random.Random(seed), [], 0
    for _ in range(num_requests):
        if num_images and rng.random() < repeat:
            indexes.append(rng.randrange(num_images))
        else:
            indexes.append(num_images)
            num_images += 1
    return indexes


def chat(image: bytes) -> gateway_pb2.ChatRequest:
    content = [gateway_pb2.ContentPart(image=gateway_pb2.ImagePart(data=image)), gateway_pb2.ContentPart(text=QUESTION)]
    return gateway_pb2.ChatRequest(messages=[gateway_pb2.Message(role=gateway_pb2.ROLE_USER, content=content)],
                                   sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0.0))


async def run(gateway: str, images: list[bytes], indexes: list[int], concurrency: int) -> dict:
    seen: set[int] = set()
    todo = iter(indexes)
    records = []   # (is a repeat, prompt tokens, cached prompt tokens, seconds to the first token)

    async def caller(stub) -> None:
        for index in todo:
            is_repeat = index in seen
            seen.add(index)
            started, first_token_s, last = time.perf_counter(), None, None
            async for response in stub.Chat(chat(images[index]), timeout=120):
                if response.token_ids and first_token_s is None:
                    first_token_s = time.perf_counter() - started
                last = response
            records.append((is_repeat, last.usage.prompt_tokens, last.usage.cached_prompt_tokens, first_token_s))

    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        started = time.perf_counter()
        await asyncio.gather(*(caller(stub) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    repeats = [record for record in records if record[0]]
    first_tokens = [record[3] for record in records]
    return {
        "hit_fraction": sum(r[2] for r in records) / sum(r[1] for r in records),
        "hit_fraction_of_repeats": sum(r[2] for r in repeats) / sum(r[1] for r in repeats),
        "repeats": len(repeats),
        "requests_per_s": len(records) / seconds,
        "ttft_p50_ms": 1000 * percentile(first_tokens, 0.5),
        "ttft_p99_ms": 1000 * percentile(first_tokens, 0.99),
    }


def decoder_prompt_tokens(addresses: list[str]) -> list[int]:
    """Prompt tokens each decoder has admitted so far (its Info)."""
    counts = []
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            counts.append(decoder_pb2_grpc.DecoderStub(channel).Info(
                decoder_pb2.InfoRequest(), timeout=10).num_prefix_queried_tokens)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per policy")
    parser.add_argument("--repeat", type=float, default=0.9, help="share of requests about an image seen before")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=256, help="side of the square images")
    parser.add_argument("--kv-cache-gib", type=float, default=0.0, help="each decoder's; 0: the decoder's default")
    parser.add_argument("--load-factor", type=float, default=1.25, help="the affinity gateway's --routing-load-factor")
    parser.add_argument("--load-slack", type=int, default=32, help="the affinity gateway's --routing-load-slack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the three model processes on one GPU")
    parser.add_argument("--model", default="tiny", help="a checkpoint directory, tiny, or random-12b (the "
                                                        "Pixtral-12B shape, random weights)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.42,
                        help="each decoder's share of the GPU (cuda)")
    args = parser.parse_args()

    indexes = workload(args.requests, args.repeat, args.seed)
    num_images = max(indexes) + 1
    threads = ("--torch-threads", str(max(1, (os.cpu_count() or 1) // 3)))   # two decoders, one vision worker
    kv = ("--kv-cache-gib", str(args.kv_cache_gib)) if args.kv_cache_gib else ()
    device = ("--device", args.device)
    shares = ("--gpu-memory-utilization", str(args.gpu_memory_utilization)) if args.device == "cuda" else ()
    if args.model == "random-12b":
        from bench.e2e import random_12b_dir
        model = random_12b_dir()
    else:
        model = resolve_model(args.model)
    server = RedisServer().start()
    workdir = Path(tempfile.mkdtemp(prefix="pixtral-affinity-"))
    stack = Stack(model, server.url, workdir, num_decoders=2, decoder_args=(*threads, *kv, *device, *shares),
                  vision_args=(*threads, *device), gateway_args=("--routing-load-factor", str(args.load_factor),
                                                                 "--routing-load-slack", str(args.load_slack)),
                  with_metrics=True, serve_timeout_s=600.0 if args.device == "cuda" else 120.0)
    results = {"cpus": os.cpu_count(), "requests": args.requests, "repeat": args.repeat, "images": num_images,
               "concurrency": args.concurrency, "image_size": args.image_size, "kv_cache_gib": args.kv_cache_gib,
               "load_factor": args.load_factor, "load_slack": args.load_slack, "device": args.device,
               "model": args.model}
    try:
        stack.start()
        gateways = {"affinity": stack.gateway,
                    "least-busy": stack.start_gateway("gateway-least-busy", ("--routing", "least-busy"))}
        for run_index, (routing, gateway) in enumerate(gateways.items()):
            # Images of this run only: the seed space of each run apart from the other's.
            images = [noise_png(args.image_size, args.image_size, (run_index + 1) * 1_000_000 + args.seed * 10_000
                                + index) for index in range(num_images)]
            before = decoder_prompt_tokens(stack.decoders)
            figures = asyncio.run(run(gateway, images, indexes, args.concurrency))
            after = decoder_prompt_tokens(stack.decoders)
            shares = [a - b for a, b in zip(after, before)]
            figures["decoder_prompt_token_shares"] = [round(share / sum(shares), 3) for share in shares]
            name = "gateway" if routing == "affinity" else "gateway-least-busy"
            figures["spilled"] = int(metric_value(stack.metrics(name), "pixtral_gateway_decoder_choices_total",
                                                  reason="spilled") or 0)
            for key, value in figures.items():
                results[f"{routing}_{key}"] = value
    finally:
        stack.stop()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    save("affinity", results)


if __name__ == "__main__":
    main()
