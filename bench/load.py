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
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import percentile, save
from bench.load_calls import (
    ChatSpec,
    GrpcCalls,
    HttpCalls,
    ImageSource,
    Outcome,
    parse_range,
    parse_sizes,
)
from bench.load_engine import engine_only
from bench.load_processes import cpu_seconds, cpu_used, memory_report, sample_rss


@dataclass
class Load:
    gateway: str                  # host:port of gRPC, or the HTTP API's base URL (http://host:port/v1)
    concurrency: int
    rate: float
    duration_s: float
    num_requests: int
    num_images: int
    images: ImageSource
    max_tokens: tuple[int, int]
    temperature: float
    timeout_s: float
    error_backoff_s: float
    rng: random.Random
    protocol: str = "grpc"
    outcomes: list[Outcome] = field(default_factory=list)
    num_client_dropped: int = 0
    _issued: int = 0

    def _next_request(self) -> ChatSpec | None:
        if self.num_requests and self._issued >= self.num_requests:
            return None
        index = self._issued
        self._issued += 1
        images = [self.images.next() for _ in range(self.num_images)]
        return ChatSpec(index, images, self.rng.randint(*self.max_tokens), self.temperature)

    def _is_over(self, started: float) -> bool:
        return bool(self.duration_s) and time.monotonic() - started >= self.duration_s

    async def run(self) -> float:
        """Runs the load; returns its wall-clock seconds (from the first request to the last answer)."""
        calls = HttpCalls(self.gateway, self.concurrency) if self.protocol == "http" else GrpcCalls(self.gateway)
        try:
            started = time.monotonic()
            if self.rate:
                await self._open_loop(calls, started)
            else:
                await asyncio.gather(*(self._caller(calls, started) for _ in range(self.concurrency)))
            return time.monotonic() - started
        finally:
            await calls.close()

    async def _caller(self, calls, started: float) -> None:
        while not self._is_over(started):
            request = self._next_request()
            if request is None:
                return
            outcome = await calls.chat(request, self.timeout_s)
            self.outcomes.append(outcome)
            if outcome.code != "OK" and self.error_backoff_s:
                await asyncio.sleep(self.error_backoff_s)

    async def _open_loop(self, calls, started: float) -> None:
        outstanding: set[asyncio.Task] = set()
        next_at = started
        while not self._is_over(started):
            request = self._next_request()
            if request is None:
                break
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += self.rng.expovariate(self.rate)
            if len(outstanding) >= self.concurrency:
                self.num_client_dropped += 1
                continue
            task = asyncio.ensure_future(calls.chat(request, self.timeout_s))
            task.add_done_callback(lambda done: (outstanding.discard(done), self.outcomes.append(done.result())))
            outstanding.add(task)
        if outstanding:
            await asyncio.wait(outstanding)


# -- report -------------------------------------------------------------------------------------------------------

def summarize(outcomes: list[Outcome], wall_s: float, num_client_dropped: int) -> dict:
    ok = [o for o in outcomes if o.code == "OK"]
    results = {"requests": len(outcomes), "ok": len(ok), "wall_s": wall_s,
               "errors": dict(Counter(o.code for o in outcomes if o.code != "OK")),
               "client_dropped": num_client_dropped,
               "requests_per_s": len(ok) / wall_s if wall_s else 0.0,
               "tokens_per_s": sum(o.num_tokens for o in ok) / wall_s if wall_s else 0.0,
               "images_per_s": sum(o.num_images for o in ok) / wall_s if wall_s else 0.0,
               "encoded_images_per_s": sum(o.num_encoded for o in ok) / wall_s if wall_s else 0.0}
    num_cached, num_encoded = sum(o.num_cached for o in ok), sum(o.num_encoded for o in ok)
    results["cache_hit_ratio"] = num_cached / (num_cached + num_encoded) if num_cached + num_encoded else None
    for name, values in (("ttft", [o.ttft for o in ok if o.ttft is not None]),
                         ("tpot", [o.tpot for o in ok if o.tpot is not None]),
                         ("latency", [o.seconds for o in ok]),
                         ("error_latency", [o.seconds for o in outcomes if o.code != "OK"])):
        for q in (0.5, 0.95, 0.99):
            value = percentile(values, q)
            results[f"{name}_p{int(q * 100)}_ms"] = None if value is None else 1000 * value
    return results


# -- CPU of the processes ---------------------------------------------------------------------------------------

def start_stack(args, model: str = "tiny", device: str = "cpu", metrics_port: int | None = None,
                log_dir: Path | None = None) -> tuple[object, object, str, str, dict[str, int]]:
    """(launcher, redis server, gateway address, its HTTP API's URL, {process name: pid}) of the stack started for
    the run: `model` (a checkpoint directory or tiny) on `device`; `metrics_port`: the launcher's --metrics-port
    (None: its default)."""
    from services.launcher import Launcher
    from services.local_processes import free_port
    from services.serve_config import ServeConfig
    from tests.support import RedisServer
    for setting in args.set:
        name, _, value = setting.partition("=")
        os.environ[f"PIXTRAL_{name.upper()}"] = value   # read by the roles' configs; unknown ones are ignored
    # Its own Redis: a clean cache, and its memory measured too. With a memory cap, as deploy/ lays it out: only
    # embeddings (written with an expiry) are evicted, never the job stream.
    cap = ("--maxmemory", f"{args.redis_maxmemory_mib}mb", "--maxmemory-policy", "volatile-lru") \
        if args.redis_maxmemory_mib else ()
    if cap:
        os.environ["PIXTRAL_EMBEDDING_TTL_S"] = "86400"
    redis_server = RedisServer(cap).start()
    http_port = free_port()
    metrics = {} if metrics_port is None else {"metrics_port": metrics_port}
    launcher = Launcher(ServeConfig(model=model, device=device, redis=redis_server.url,
                                    vision_workers=args.vision_workers, decoders=args.decoders, port=free_port(),
                                    http_port=http_port, **metrics), log_dir=log_dir)
    gateway = launcher.start()
    pids = {name.replace(" ", ""): process.pid for name, process in launcher.children}
    pids["redis"] = redis_server.process.pid
    return launcher, redis_server, gateway, f"http://127.0.0.1:{http_port}/v1", pids


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


@dataclass(frozen=True)
class LoadSpec:
    """One load's shape, whatever drives it: load.py's flags or another benchmark's workloads."""

    concurrency: int              # callers (closed loop), or the most requests outstanding (open loop)
    rate: float = 0.0             # arrivals per second; 0: closed loop
    duration_s: float = 0.0
    num_requests: int = 0
    num_images: int = 0
    image_sizes: tuple[tuple[int, int], ...] = ((256, 256),)
    repeat_share: float = 0.0
    max_tokens: tuple[int, int] = (32, 32)
    temperature: float = 1.0
    timeout_s: float = 120.0
    error_backoff_s: float = 0.1
    num_warmup: int = 4
    seed: int = 0

    @classmethod
    def from_args(cls, args) -> LoadSpec:
        return cls(concurrency=args.concurrency, rate=args.rate, duration_s=args.duration,
                   num_requests=args.requests, num_images=args.images,
                   image_sizes=tuple(parse_sizes(args.image_sizes)), repeat_share=args.repeat,
                   max_tokens=parse_range(args.max_tokens), temperature=args.temperature, timeout_s=args.timeout,
                   error_backoff_s=args.error_backoff_ms / 1000, num_warmup=args.warmup, seed=args.seed)


async def run_load(spec: LoadSpec, protocol: str, target: str, pids: dict[str, int]) -> dict:
    """One load's results (summarize's, and the CPU each process used per request answered): the same request
    mix for the same seed, images new to the cache."""
    rng = random.Random(spec.seed)
    load = Load(gateway=target, concurrency=spec.concurrency, rate=spec.rate, duration_s=spec.duration_s,
                num_requests=spec.num_requests, num_images=spec.num_images,
                images=ImageSource(list(spec.image_sizes), spec.repeat_share, rng), max_tokens=spec.max_tokens,
                temperature=spec.temperature, timeout_s=spec.timeout_s, error_backoff_s=spec.error_backoff_s,
                rng=rng, protocol=protocol)
    if spec.num_warmup:
        warm = Load(target, 1, 0.0, 0.0, spec.num_warmup, spec.num_images,
                    ImageSource(list(spec.image_sizes), 0.0, random.Random(-1)), (4, 4), 0.0, spec.timeout_s, 0.0,
                    random.Random(-1), protocol=protocol)
        await warm.run()
    processes = pids | {"load": os.getpid()}
    before = {name: cpu_seconds(pid) for name, pid in processes.items()}
    wall = await load.run()
    results = summarize(load.outcomes, wall, load.num_client_dropped)
    # Where the CPU went, per request answered: on a small machine the load generator competes for it too.
    used = cpu_used(processes, before)
    results["cpu_ms_per_request"] = {name: 1000 * seconds / max(1, results["ok"]) for name, seconds in used.items()}
    return results


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
