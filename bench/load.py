"""Load generator: drives a gateway with a mix of chats and reports throughput, latency, errors and cache hits.

    python -m bench.load --concurrency 16 --requests 200 --max-tokens 64            # starts the tiny stack itself
    python -m bench.load --gateway host:50051 --duration 60 --rate 20 --images 1    # a running gateway
    python -m bench.load --images 1 --image-sizes 256x256 --repeat 0.8 --max-tokens 1 --vision-workers 2
    python -m bench.load --soak --duration 180 --concurrency 8 --images 1 --repeat 0.5
    python -m bench.load --protocol both --concurrency 16 --requests 96 --max-tokens 128 --temperature 0

Load: `--concurrency N` callers sending back to back (closed loop; a caller waits `--error-backoff-ms` after a
failed call, as a client with backoff does), or `--rate R` arrivals per second (open loop, Poisson; at most
`--concurrency` outstanding, arrivals beyond it are counted as client_dropped), for `--duration` seconds or
`--requests` requests. Each request is one user message: `--images` images (sizes drawn from `--image-sizes`; a
share `--repeat` of them repeat an image sent before in the run, the others are new) and a text; `--max-tokens`
new tokens (`A` or a range `A-B`), temperature `--temperature`.

`--protocol http` sends the same chats to the gateway's OpenAI-compatible HTTP API instead (`POST
/v1/chat/completions`, streamed as server-sent events, images as data: URLs; `--http URL` of a running gateway's
API, e.g. http://host:8000/v1); `--protocol grpc,http` (or `both`; `http,grpc` for the other order) measures each on
the same stack in the same run, one after the other, each with the same request mix and images of its own, and
reports them by protocol.

Without `--gateway` it starts the stack (pixtral-serve's launcher: tiny model on the CPU, its own Redis) with
`--vision-workers` and `--decoders`; `--set name=value` passes a role setting (PIXTRAL_NAME) to every role, e.g.
`--set max_num_seqs=8 --set max_queued=8`. `--engine-only` runs the decoder engine alone in this process (no
gRPC, no gateway) with `--concurrency` sequences: the baseline of the per-token cost of streaming. `--soak`
samples the resident memory of every process of the stack (/proc/<pid>/status VmRSS; `--pid` adds others, e.g.
of a running stack) and says whether it stays flat: growth over the second half of the run below
`--max-growth-mib` per process.

Reports requests/s, tokens/s, images/s, p50/p95/p99 time to first token and time per output token, errors by
status code, the cache hit ratio (usage: images served from cache over images of successful requests), and the CPU
milliseconds each process used per request answered (the stack's when it started it or `--pid` names them, and
its own).
Results: printed, and written to $OUT/load-<name>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from bench.common import save
from bench.load_engine import engine_only
from bench.load_processes import memory_report, sample_rss
from bench.load_run import LoadSpec, run_load
from bench.load_stack import start_stack


def print_report(results: dict) -> None:
    def ms(key: str) -> str:
        value = results.get(key)
        return "-" if value is None else f"{value:.1f}"
    print(f"requests {results['requests']} ok {results['ok']} errors {results['errors']} "
          f"client_dropped {results['client_dropped']} in {results['wall_s']:.1f} s", file=sys.stderr)
    hit_ratio = "-" if results["cache_hit_ratio"] is None else f"{results['cache_hit_ratio']:.3f}"
    print(f"requests/s {results['requests_per_s']:.2f}  tokens/s {results['tokens_per_s']:.1f}  "
          f"images/s {results['images_per_s']:.2f} (encoded {results['encoded_images_per_s']:.2f})  "
          f"cache hit ratio {hit_ratio}", file=sys.stderr)
    for name in ("ttft", "tpot", "latency", "error_latency"):
        print(f"{name:>14} p50 {ms(f'{name}_p50_ms')} ms  p95 {ms(f'{name}_p95_ms')} ms  "
              f"p99 {ms(f'{name}_p99_ms')} ms", file=sys.stderr)
    if results.get("cpu_ms_per_request"):
        print("CPU ms per request: " + ", ".join(f"{name} {value:.2f}" for name, value in
                                                 results["cpu_ms_per_request"].items()), file=sys.stderr)


def print_memory(report: dict) -> None:
    for name, memory in report.items():
        print(f"{name:>14} RSS start {memory['start_mib']:.0f} MiB, middle {memory['middle_mib']:.0f}, end "
              f"{memory['end_mib']:.0f}, peak {memory['peak_mib']:.0f}; growth over the second half "
              f"{memory['growth_second_half_mib']:+.1f} MiB: {'flat' if memory['is_flat'] else 'GROWING'}",
              file=sys.stderr)


async def measure_protocol(args, protocol: str, target: str, pids: dict[str, int]) -> dict:
    """One protocol's run: the same request mix for each (the seed's), images new to the cache."""
    return await run_load(LoadSpec.from_args(args), protocol, target, pids)


async def measure(args, targets: dict[str, str], pids: dict[str, int]) -> dict:
    """`targets`: protocol -> the gateway's address for it, measured one after the other. One protocol: its
    results; several: their results by protocol."""
    stop, samples = asyncio.Event(), {}
    sampler = asyncio.ensure_future(sample_rss(pids, args.rss_interval_s, samples, stop)) if args.soak else None
    by_protocol = {protocol: await measure_protocol(args, protocol, target, pids)
                   for protocol, target in targets.items()}
    stop.set()
    if sampler is not None:
        await sampler
    results = next(iter(by_protocol.values())) if len(by_protocol) == 1 else dict(by_protocol)
    if args.soak:
        results["memory"] = memory_report(samples, args.max_growth_mib)
        results["memory_is_flat"] = all(memory["is_flat"] for memory in results["memory"].values())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", help="a running gateway host:port; default: start the tiny stack")
    parser.add_argument("--protocol", default="grpc",
                        help="grpc, http (the gateway's OpenAI-compatible API), or several one after the other in "
                             "the order given, comma-separated; both: grpc,http")
    parser.add_argument("--http", help="with --gateway: the running gateway's HTTP API, e.g. http://host:8000/v1")
    parser.add_argument("--concurrency", type=int, default=8, help="callers (closed loop) or outstanding cap")
    parser.add_argument("--rate", type=float, default=0.0, help="arrivals per second (open loop); 0: closed loop")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds of load")
    parser.add_argument("--requests", type=int, default=0, help="requests in all (default 100 without --duration)")
    parser.add_argument("--images", type=int, default=0, help="images per request")
    parser.add_argument("--image-sizes", default="256x256", help="WxH,... drawn at random for each new image")
    parser.add_argument("--repeat", type=float, default=0.0, help="share of images that repeat one sent before")
    parser.add_argument("--max-tokens", default="32", help="new tokens per request: N or a range A-B")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of each call (seconds)")
    parser.add_argument("--error-backoff-ms", type=float, default=100.0, help="closed loop: wait after an error")
    parser.add_argument("--warmup", type=int, default=4, help="requests before the measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-workers", type=int, default=1, help="stack started here: vision workers")
    parser.add_argument("--decoders", type=int, default=1, help="stack started here: decoders")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="stack started here: a role setting (PIXTRAL_NAME) for every role")
    parser.add_argument("--redis-maxmemory-mib", type=int, default=0,
                        help="stack started here: cap its Redis, embeddings evictable (volatile-lru); 0: no cap")
    parser.add_argument("--engine-only", action="store_true", help="the decoder engine alone, in this process")
    parser.add_argument("--engine-threads", type=int, default=1, help="--engine-only: torch threads")
    parser.add_argument("--soak", action="store_true", help="sample every process's RSS; report whether flat")
    parser.add_argument("--pid", action="append", default=[], type=int, help="soak: another process to watch")
    parser.add_argument("--rss-interval-s", type=float, default=2.0)
    parser.add_argument("--max-growth-mib", type=float, default=16.0, help="soak: 'flat' below this growth")
    parser.add_argument("--name", default="load", help="results go to $OUT/load-<name>.json")
    args = parser.parse_args(argv)
    if not args.duration and not args.requests:
        args.requests = 100
    if args.engine_only:
        results = engine_only(args)
        save(f"load-{args.name}", results)
        return 0
    protocols = tuple(("grpc", "http") if args.protocol == "both" else args.protocol.split(","))
    if len(set(protocols)) != len(protocols) or not set(protocols) <= {"grpc", "http"}:
        parser.error(f"--protocol: grpc, http, both or a comma-separated list of them, got {args.protocol!r}")
    if args.gateway and "http" in protocols and not args.http:
        parser.error("--protocol http with --gateway needs --http (the gateway's HTTP API URL)")
    launcher = redis_server = None
    try:
        if args.gateway:
            gateway, http, pids = args.gateway, args.http, {}
        else:
            launcher, redis_server, gateway, http, pids = start_stack(args)
        pids.update({f"pid{pid}": pid for pid in args.pid})
        targets = {protocol: gateway if protocol == "grpc" else http for protocol in protocols}
        results = asyncio.run(measure(args, targets, pids))
    finally:
        if launcher is not None:
            launcher.stop()
        if redis_server is not None:
            redis_server.stop()
    results["cpus"] = os.cpu_count()
    results["args"] = vars(args)
    for protocol in protocols:
        if len(protocols) > 1:
            print(f"== {protocol}", file=sys.stderr)
        print_report(results[protocol] if len(protocols) > 1 else results)
    print_memory(results.get("memory", {}))
    save(f"load-{args.name}", results)
    return 0 if not args.soak or results["memory_is_flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
