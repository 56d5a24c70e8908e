"""Throughput of the vision pool alone: N workers on the tiny model draining a burst of encode jobs.

    python -m bench.pool --workers 1,2,4 --images 64 --size 256

Jobs are added to the stream directly (as gateways do), and results are read from the pub/sub channel; reports
images/s over the burst and the per-image latency (enqueue -> result) percentiles for each pool size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import redis

from bench.common import noise_png, save
from shared import encode_jobs, fingerprints
from shared.encode_jobs import EncodeJob, EncodeResult
from shared.images import sha256_hex
from shared.tiny import resolve_model
from tests.support import RedisServer, Stack


def burst(redis_url: str, fingerprint: str, images: list[bytes]) -> tuple[float, list[float]]:
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(encode_jobs.done_channel(fingerprint))
    sent = {}
    started = time.perf_counter()
    for image in images:
        sha = sha256_hex(image)
        sent[sha] = time.perf_counter()
        client.xadd(encode_jobs.STREAM, EncodeJob(sha, fingerprint, image, "bench").to_fields())
    latencies = []
    while len(latencies) < len(images):
        message = pubsub.get_message(timeout=60)
        if message is None:
            continue
        result = EncodeResult.from_json(message["data"])
        if result.sha256 in sent:
            latencies.append(time.perf_counter() - sent.pop(result.sha256))
    return time.perf_counter() - started, sorted(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    model = resolve_model("tiny")
    fingerprint = fingerprints.vision_fingerprint(model)
    results = {"cpus": os.cpu_count(), "image_size": args.size, "images": args.images}
    for num_workers in map(int, args.workers.split(",")):
        server = RedisServer().start()
        workdir = tempfile.mkdtemp(prefix="pixtral-pool-")
        threads = str(max(1, (os.cpu_count() or 1) // num_workers))   # as pixtral-serve shares the cores
        stack = Stack(model, server.url, Path(workdir), num_vision=0, vision_args=("--torch-threads", threads))
        try:
            for _ in range(num_workers):
                stack.start_vision()
            seed = time.time_ns() % (1 << 30)
            images = [noise_png(args.size, args.size, seed + i) for i in range(args.images)]
            seconds, latencies = burst(server.url, fingerprint, images)
            results[f"workers{num_workers}_img_s"] = len(images) / seconds
            results[f"workers{num_workers}_latency_p50_ms"] = 1000 * latencies[len(latencies) // 2]
            results[f"workers{num_workers}_latency_p99_ms"] = 1000 * latencies[int(0.99 * (len(latencies) - 1))]
        finally:
            stack.stop()
            server.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    save("pool", results)


if __name__ == "__main__":
    main()
