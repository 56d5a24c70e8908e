"""Embedding-cache reads from one machine: reads per second and MiB/s of a few reader processes against a Redis
Cluster of three primaries, beside the same readers against one plain Redis, in the same run.

Each reader is a process of its own, as a decoder is, with one read in flight at a time: `raw` is a GET of one
embedding through redis-py's client (the cluster client routes it to its slot's node), `fetch` is the decoder's
own path (services/decoder/features.py: the MGET, then the header, length and xxh3 checks and the finite-values
check of decode_entry) with its local copy off. Values are those of a 1024x1024 image by default: 4096 x 1024
bfloat16 features (8 MiB), as the vision workers write them.

    python -m bench.cache_reads                                 # local cluster and Redis, 1, 2 and 4 readers
    python -m bench.cache_reads --readers 1,2,4,8 --seconds 10
    python -m bench.cache_reads --url redis://node:6379/0       # a Redis (or any node of a cluster) elsewhere

Results go to $OUT/cache_reads.json (bench/common.py). The readers and the Redis servers share this machine's
cores: on a small machine the figures are bound by its CPU (copying and checking MiB-sized values), not by Redis
or the network.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import time

import torch

from bench.common import save
from shared.embedding_cache import cache_key, encode_entry
from shared.redis_client import Endpoint

FINGERPRINT = "b" * 16
NUM_COLUMNS = 1024   # the vision hidden size: features are cached before the projector


def fill(url: str, num_images: int, size: int) -> list[str]:
    """Writes `num_images` embeddings of a size x size image; their hashes."""
    grid = (size // 16, size // 16)
    value_rows = grid[0] * grid[1]

    async def run() -> list[str]:
        endpoint = Endpoint(url, timeout_s=30.0)
        client = await endpoint.client()
        shas = []
        try:
            for index in range(num_images):
                sha = f"{index:064x}"
                features = torch.randn(value_rows, NUM_COLUMNS, generator=torch.Generator().manual_seed(index))
                await client.set(cache_key(FINGERPRINT, sha),
                                 encode_entry(features.to(torch.bfloat16), grid, FINGERPRINT, sha))
                shas.append(sha)
        finally:
            await endpoint.aclose()
        return shas
    return asyncio.run(run())


def _reader(url: str, shas: list[str], grid: tuple[int, int], mode: str, seconds: float, start, results) -> None:
    torch.set_num_threads(1)
    from services.decoder.features import FeatureStore

    async def run() -> tuple[int, int, float]:
        endpoint = Endpoint(url, timeout_s=30.0)
        client = await endpoint.client()
        store = FeatureStore(endpoint, FINGERPRINT, NUM_COLUMNS, local_capacity_bytes=0)
        rng = random.Random(os.getpid())
        await client.get(cache_key(FINGERPRINT, shas[0]))   # connected before the clock starts
        start.wait()
        num_reads = num_bytes = 0
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            sha = rng.choice(shas)
            if mode == "raw":
                value = await client.get(cache_key(FINGERPRINT, sha))
                num_bytes += len(value)
            else:
                features = await store.fetch([(sha, grid)])
                num_bytes += features.numel() * features.element_size()
            num_reads += 1
        elapsed = time.perf_counter() - began
        await endpoint.aclose()
        return num_reads, num_bytes, elapsed
    results.put(asyncio.run(run()))


def measure(url: str, shas: list[str], size: int, mode: str, num_readers: int, seconds: float) -> dict:
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    grid = (size // 16, size // 16)
    readers = [context.Process(target=_reader, args=(url, shas, grid, mode, seconds, start, results))
               for _ in range(num_readers)]
    for reader in readers:
        reader.start()
    time.sleep(3.0)   # the readers import and connect
    start.set()
    outcomes = [results.get(timeout=seconds + 120) for _ in readers]
    for reader in readers:
        reader.join()
    elapsed = max(outcome[2] for outcome in outcomes)
    num_reads, num_bytes = sum(o[0] for o in outcomes), sum(o[1] for o in outcomes)
    return {"reads_per_s": num_reads / elapsed, "mib_per_s": num_bytes / elapsed / 2**20,
            "ms_per_read": 1000 * elapsed * num_readers / max(1, num_reads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="", help="a Redis (or a node of a cluster) to read; empty: a local "
                                                  "three-primary cluster and one plain Redis, started here")
    parser.add_argument("--readers", default="1,2,4", help="reader processes, comma-separated runs")
    parser.add_argument("--modes", default="raw,fetch")
    parser.add_argument("--images", type=int, default=32, help="embeddings written and read at random")
    parser.add_argument("--size", type=int, default=1024, help="image side: 1024 = 8 MiB values")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    from tests.support import LocalRedisCluster, RedisServer   # local servers as the tests start them
    started = []
    targets = {"given": args.url} if args.url else {}
    if not args.url:
        cluster = LocalRedisCluster(num_primaries=3).start()
        plain = RedisServer().start()
        started = [cluster, plain]
        targets = {"cluster3": cluster.url, "plain": plain.url}
    results = {"cpus": os.cpu_count(), "images": args.images, "size": args.size, "seconds": args.seconds}
    try:
        for target, url in targets.items():
            shas = fill(url, args.images, args.size)
            for mode in args.modes.split(","):
                for num_readers in map(int, args.readers.split(",")):
                    figures = measure(url, shas, args.size, mode, num_readers, args.seconds)
                    for name, value in figures.items():
                        results[f"{target}_{mode}_{num_readers}_readers_{name}"] = value
    finally:
        for server in started:
            server.stop()
    save("cache_reads", results)


if __name__ == "__main__":
    main()
