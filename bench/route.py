"""A request's route through the gateway, for this checkout and (with `--before DIR`) another one, in one run.

    python -m bench.route --before /tmp/pixtral-before        # CPU, tiny model
    python -m bench.route --device cuda --model random-12b

For each source tree the whole stack is started (pixtral-serve's launcher, the roles' code from that tree) and two
things are measured:

- time to first token of requests whose image is new (each a different 512x512 image and ~32 tokens of text,
  one at a time, greedy, 1 new token): the image's encode and the chat's tokenization can overlap;
- the gateway's event loop while it takes one request with a 16 MiB image as a data: URL: a health check is sent
  every 5 ms meanwhile (the event loop answers it), and its slowest answer, less the median, is the loop's longest
  stall.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import QUESTION, gpu_name, noise_png, percentile, save
from bench.e2e import random_12b_dir, request
from pixtral.v1 import gateway_pb2, gateway_pb2_grpc
from services.launcher import Launcher
from services.local_processes import free_port
from services.serve_config import ServeConfig

ROOT = Path(__file__).resolve().parent.parent


def big_data_url_request(num_bytes: int, seed: int) -> gateway_pb2.ChatRequest:
    side = int((num_bytes / 3) ** 0.5) + 1   # noise compresses to nothing: about 3 bytes a pixel
    data = noise_png(side, side, seed)
    message = request(b"", 1)
    message.messages[0].content[0].image.Clear()
    message.messages[0].content[0].image.url = "data:image/png;base64," + base64.b64encode(data).decode()
    return message


async def first_token_s(stub, message) -> float:
    started = time.perf_counter()
    async for response in stub.Chat(message, timeout=600):
        if response.token_ids:
            return time.perf_counter() - started
    raise RuntimeError("no token")


async def longest_stall_ms(channel, stub, message) -> tuple[float, float]:
    """(the slowest health answer less the median, the median) in ms while `message` is served."""
    health = health_pb2_grpc.HealthStub(channel)
    answers: list[float] = []
    done = asyncio.Event()

    async def ping() -> None:
        while not done.is_set():
            started = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            answers.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)

    pinger = asyncio.create_task(ping())
    await asyncio.sleep(0.2)
    await first_token_s(stub, message)
    done.set()
    await pinger
    median = statistics.median(answers)
    return 1000 * (max(answers) - median), 1000 * median


async def measure(gateway: str, args) -> dict:
    options = [("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(gateway, options=options) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        await first_token_s(stub, request(noise_png(64, 64, 999), 1))   # warm-up
        seed = time.time_ns() % (1 << 30)
        ttfts = [await first_token_s(stub, request(noise_png(args.image_size, args.image_size, seed + i), 1,
                                                   QUESTION)) for i in range(args.requests)]
        stalls = [await longest_stall_ms(channel, stub, big_data_url_request(args.big_bytes, seed - 1 - i))
                  for i in range(args.big_requests)]
    return {"new_image_ttft_p50_ms": 1000 * statistics.median(ttfts),
            "new_image_ttft_p90_ms": 1000 * percentile(ttfts, 0.9),
            "new_image_ttft_mean_ms": 1000 * statistics.mean(ttfts),
            "big_data_url_stall_max_ms": max(stall for stall, _ in stalls),
            "big_data_url_stall_median_ms": statistics.median(stall for stall, _ in stalls),
            "health_answer_median_ms": statistics.median(median for _, median in stalls)}


def run(source: Path, model: str, args) -> dict:
    """The stack with the roles' code from `source`."""
    os.environ["PYTHONPATH"] = str(source) + os.pathsep + os.environ.get("PYTHONPATH", "")
    launcher = Launcher(ServeConfig(model=model, device=args.device, port=free_port()))
    try:
        return asyncio.run(measure(launcher.start(), args))
    finally:
        launcher.stop()
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help="a checkpoint directory, tiny, or random-12b")
    parser.add_argument("--before", default="", help="another source tree to measure first (e.g. an older commit)")
    parser.add_argument("--requests", type=int, default=20, help="new-image requests, one at a time")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--big-bytes", type=int, default=16 << 20, help="size of the data: URL's image file")
    parser.add_argument("--big-requests", type=int, default=3)
    parser.add_argument("--name", default="route")
    args = parser.parse_args()
    model = str(random_12b_dir()) if args.model == "random-12b" else args.model
    results = {"device": gpu_name() if args.device == "cuda" else "cpu", "model": args.model}
    sources = ([("before", Path(args.before))] if args.before else []) + [("after", ROOT)]
    for name, source in sources:
        print(f"measuring {name}: {source}", file=sys.stderr)
        results.update({f"{name}_{key}": value for key, value in run(source, model, args).items()})
    save(args.name, results)


if __name__ == "__main__":
    main()
