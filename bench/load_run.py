"""One load on a gateway, whatever drives it (bench/load.py's flags, bench/goodput.py's workloads): its shape
(`LoadSpec`), the callers that send it (closed loop, or Poisson arrivals in an open loop), and its results
(`summarize`, with the CPU each process used per request answered)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.common import percentile
from bench.load_calls import ChatSpec, GrpcCalls, HttpCalls, ImageSource, Outcome, parse_range, parse_sizes
from bench.load_processes import cpu_seconds, cpu_used


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

