"""Goodput under load: the stack's throughput and latency for a few fixed workloads, and the highest arrival rate
it serves within a latency SLO.

    python -m bench.goodput --device cuda --model random-12b        # GPU, full Pixtral-12B shape, random weights
    python -m bench.goodput                                          # CPU, tiny model, small workloads (~2 min)
    python -m bench.goodput --gateway host:50051 --gateway-metrics http://host:9100/metrics --device cuda
    python -m bench.goodput --workloads rate-sweep --rates 4,8,12,16 --duration 30 --sweep-repeats

Workloads (`--workloads`, comma-separated; all by default), each with the request mix of `--seed` (bench/load.py's
request generator: the same seed, the same images, lengths and order):

- `new-images`: `--callers` closed-loop callers, one image a request (sizes drawn from `--image-sizes`, every image
  new to the cache), `--max-tokens` new tokens, greedy; `--requests-per-caller` requests per caller.
- `repeats-90`: the same, with a share `--repeat` (0.9) of the images repeating one sent before in the run.
- `text-256`: text only, `--text-callers` callers x `--text-tokens` new tokens. The decoders batch at most
  `max_num_seqs` sequences (64 by default): with this workload selected, a stack started here gets
  `--set max_num_seqs=<text callers>` unless `--set` names max_num_seqs already. A running gateway (`--gateway`)
  must have decoders started with `--max-num-seqs` that large for the figures to mean all callers at once.
- `rate-sweep`: open loop (Poisson arrivals) at each rate of `--rates`, `--duration` seconds each, of the new-image
  mix (and with `--sweep-repeats` of the 90%-repeats mix too); at most `--max-outstanding` requests outstanding,
  arrivals beyond it are counted as client_dropped.

Defaults on `--device cuda`: 64 callers, images 512x512/1024x768/768x1024/1024x1024/640x480, 64-192 tokens, 256 text
callers x 256 tokens, rates 2,4,...,16, 60 s a rate. On `--device cpu` (the tiny model): 64x64 images, 4 callers,
8-16 tokens, 8 text callers x 16 tokens, rates 4,8,16,32,64, 5 s a rate. Every flag overrides its default.

Goodput: the highest rate of the sweep such that it and every lower rate swept meet the SLO, 0 when the lowest
does not. A rate meets it when at least one request was answered, p99 TTFT <= `--ttft-slo-s`, p99 TPOT <=
`--tpot-slo-ms` (no TPOT, every answer one token long: met), and the requests not answered (errors of any status
code, and arrivals dropped at the outstanding cap) are at most `--max-error-share` of the arrivals (default 0: none).
A rate failing between passing ones ends the goodput there: a rate the stack serves only some of the time is not
one it sustains. The sweep stops at the first failing rate unless `--full-sweep`.

Reported per workload and per rate: requests/s, tokens/s, p50/p95/p99 TTFT and TPOT, errors by status code, the
cache hit ratio (from each answer's usage), and the gateway's encode wait (its
pixtral_gateway_encode_wait_seconds histogram, read from its metrics endpoint before and after each run: count,
mean, and p50/p99 interpolated within the buckets; absent without a metrics endpoint).
Results: a table on stdout, and $OUT/goodput-<name>.json (default name: the device).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from bench.common import gpu_name, save
from bench.encode_wait import GatewayMetrics, encode_wait
from bench.load_calls import parse_range, parse_sizes
from bench.load_run import LoadSpec, run_load
from bench.load_stack import start_stack
from bench.slo import Slo, goodput, meets_slo
from services.gpu_placement import VISION_PLACEMENTS
from services.serve_config import ServeConfig

WORKLOADS = ("new-images", "repeats-90", "text-256", "rate-sweep")
DEFAULT_MAX_NUM_SEQS = 64   # the decoders' default (services/decoder/config.py)

# Per device: what a flag left unset means. CPU: the tiny model on a small machine, a run of about two minutes.
DEFAULTS = {
    "cuda": {"callers": 64, "image_sizes": "512x512,1024x768,768x1024,1024x1024,640x480", "max_tokens": "64-192",
             "requests_per_caller": 4, "text_callers": 256, "text_tokens": 256,
             "rates": "2,4,6,8,10,12,14,16", "duration": 60.0, "max_outstanding": 512, "warmup": 8},
    "cpu": {"callers": 4, "image_sizes": "64x64", "max_tokens": "8-16", "requests_per_caller": 4,
            "text_callers": 8, "text_tokens": 16, "rates": "4,8,16,32,64", "duration": 5.0, "max_outstanding": 64,
            "warmup": 2},
}


# -- workloads ----------------------------------------------------------------------------------------------------

async def measured(spec: LoadSpec, gateway: str, pids: dict[str, int], metrics: GatewayMetrics) -> dict:
    """One load's results, with the encode waits it caused when the gateway's metrics can be read."""
    before = await metrics.read()
    results = await run_load(spec, "grpc", gateway, pids)
    after = await metrics.read()
    if before is not None and after is not None:
        results.update(encode_wait(before, after))
    return results


def image_mix(args, repeat_share: float) -> LoadSpec:
    return LoadSpec(concurrency=args.callers, num_requests=args.callers * args.requests_per_caller, num_images=1,
                    image_sizes=tuple(parse_sizes(args.image_sizes)), repeat_share=repeat_share,
                    max_tokens=parse_range(args.max_tokens), temperature=args.temperature, timeout_s=args.timeout,
                    error_backoff_s=args.error_backoff_ms / 1000, num_warmup=0, seed=args.seed)


def closed_loop_specs(args) -> dict[str, LoadSpec]:
    text = LoadSpec(concurrency=args.text_callers, num_requests=args.text_callers * args.requests_per_caller,
                    max_tokens=(args.text_tokens, args.text_tokens), temperature=args.temperature,
                    timeout_s=args.timeout, error_backoff_s=args.error_backoff_ms / 1000, num_warmup=0, seed=args.seed)
    return {"new-images": image_mix(args, 0.0), "repeats-90": image_mix(args, args.repeat), "text-256": text}


def sweep_mixes(args) -> dict[str, LoadSpec]:
    """Mix name -> the open-loop load of one rate (rate and duration set per rate)."""
    mixes = {"new-images": 0.0} | ({"repeats-90": args.repeat} if args.sweep_repeats else {})
    return {name: replace(image_mix(args, share), concurrency=args.max_outstanding, num_requests=0,
                          duration_s=args.duration) for name, share in mixes.items()}


async def run_workloads(args, gateway: str, pids: dict[str, int], metrics: GatewayMetrics, slo: Slo) -> dict:
    results: dict = {}
    if args.warmup:   # first calls pay for compilation and caches warming: not any workload's figures
        await run_load(replace(image_mix(args, 0.0), concurrency=1, num_requests=args.warmup, max_tokens=(4, 4)),
                       "grpc", gateway, pids)
    for name, spec in closed_loop_specs(args).items():
        if name in args.workloads:
            print(f"-- {name}", file=sys.stderr, flush=True)
            results[name] = await measured(spec, gateway, pids, metrics)
    if "rate-sweep" in args.workloads:
        sweep = results["rate-sweep"] = {}
        for mix, spec in sweep_mixes(args).items():
            by_rate = {}
            for rate in args.rates:
                print(f"-- rate-sweep {mix} at {rate:g}/s", file=sys.stderr, flush=True)
                by_rate[rate] = await measured(replace(spec, rate=rate), gateway, pids, metrics)
                by_rate[rate]["meets_slo"] = meets_slo(by_rate[rate], slo)
                if not by_rate[rate]["meets_slo"] and not args.full_sweep:
                    break
            # Every rate swept met the SLO: the stack's goodput is this or more, the sweep did not reach it.
            sweep[mix] = {"rates": {f"{rate:g}": value for rate, value in by_rate.items()},
                          "goodput_rps": goodput(by_rate, slo),
                          "is_lower_bound": all(value["meets_slo"] for value in by_rate.values())}
    return results


# -- report -------------------------------------------------------------------------------------------------------

def table_rows(results: dict) -> list[tuple[str, str, dict]]:
    rows = [(name, "closed", value) for name, value in results.items() if name != "rate-sweep"]
    for mix, sweep in results.get("rate-sweep", {}).items():
        rows += [(f"rate-sweep {mix}", f"{rate}/s", value) for rate, value in sweep["rates"].items()]
    return rows


def print_table(results: dict, slo: Slo) -> None:
    def number(value, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"
    header = ("workload", "load", "req/s", "tok/s", "TTFT p50/p95/p99 ms", "TPOT p50/p95/p99 ms", "hit",
              "encode wait p50/p99 ms", "errors", "SLO")
    lines = [header]
    for name, load, value in table_rows(results):
        unanswered = [f"{code}:{n}" for code, n in value["errors"].items()]
        unanswered += [f"dropped:{value['client_dropped']}"] if value["client_dropped"] else []
        lines.append((name, load, number(value["requests_per_s"], 2), number(value["tokens_per_s"]),
                      "/".join(number(value[f"ttft_p{q}_ms"]) for q in (50, 95, 99)),
                      "/".join(number(value[f"tpot_p{q}_ms"]) for q in (50, 95, 99)),
                      number(value["cache_hit_ratio"], 2),
                      "/".join(number(value.get(f"encode_wait_p{q}_ms")) for q in (50, 99)),
                      ",".join(unanswered) or "-",
                      "ok" if meets_slo(value, slo) else "MISSED"))
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    for mix, sweep in results.get("rate-sweep", {}).items():
        print(f"goodput ({mix}, p99 TTFT <= {slo.ttft_s:g} s, p99 TPOT <= {slo.tpot_ms:g} ms, unanswered <= "
              f"{slo.max_error_share:.0%}): {sweep['goodput_rps']:g} requests/s" +
              (" or more (every rate swept met the SLO)" if sweep["is_lower_bound"] else ""))


# -- the stack ----------------------------------------------------------------------------------------------------

def free_port_run(length: int) -> int:
    """The first of `length` consecutive free ports (the launcher gives its roles' metrics ports in a row)."""
    from services.local_processes import free_port, is_bindable
    while True:
        first = free_port()
        if all(is_bindable(first + offset) for offset in range(length)):
            return first


def resolve_defaults(args) -> None:
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.workloads = tuple(args.workloads.split(","))
    args.rates = sorted(float(rate) for rate in args.rates.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", help="a running gateway host:port; default: start the stack here")
    parser.add_argument("--gateway-metrics", help="with --gateway: its metrics URL (http://host:9100/metrics), for "
                                                  "the encode wait")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the stack started here runs; also picks the workloads' defaults")
    parser.add_argument("--model", default="tiny", help="stack started here: a checkpoint directory, tiny, or "
                                                        "random-12b (the Pixtral-12B shape, random weights)")
    parser.add_argument("--vision-workers", type=int, default=1, help="stack started here: vision workers")
    parser.add_argument("--decoders", type=int, default=1, help="stack started here: decoders")
    parser.add_argument("--vision-gpus", choices=VISION_PLACEMENTS, default=ServeConfig.vision_gpus,
                        help="stack started here, on CUDA: where the vision workers run (pixtral-serve --vision-gpus)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="stack started here: a role setting (PIXTRAL_NAME) for every role")
    parser.add_argument("--redis-maxmemory-mib", type=int, default=0,
                        help="stack started here: cap its Redis, embeddings evictable (volatile-lru); 0: no cap")
    parser.add_argument("--log-dir", help="stack started here: the roles' logs (default: a new temporary folder)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--callers", type=int, help="image workloads: closed-loop callers")
    parser.add_argument("--requests-per-caller", type=int, help="closed-loop workloads: requests per caller")
    parser.add_argument("--image-sizes", help="WxH,... drawn at random for each new image")
    parser.add_argument("--repeat", type=float, default=0.9, help="repeats-90: share of repeated images")
    parser.add_argument("--max-tokens", help="image workloads: new tokens, N or A-B")
    parser.add_argument("--text-callers", type=int, help="text-256: closed-loop callers")
    parser.add_argument("--text-tokens", type=int, help="text-256: new tokens per request")
    parser.add_argument("--rates", help="rate-sweep: arrivals per second, comma-separated")
    parser.add_argument("--duration", type=float, help="rate-sweep: seconds at each rate")
    parser.add_argument("--max-outstanding", type=int, help="rate-sweep: requests outstanding at most")
    parser.add_argument("--sweep-repeats", action="store_true", help="rate-sweep: the 90%%-repeats mix too")
    parser.add_argument("--full-sweep", action="store_true", help="rate-sweep: go on past the first failing rate")
    parser.add_argument("--ttft-slo-s", type=float, default=2.0, help="SLO: p99 time to first token")
    parser.add_argument("--tpot-slo-ms", type=float, default=50.0, help="SLO: p99 time per output token")
    parser.add_argument("--max-error-share", type=float, default=0.0,
                        help="SLO: share of arrivals that may go unanswered (errors, client drops)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of each call (seconds)")
    parser.add_argument("--error-backoff-ms", type=float, default=100.0, help="closed loop: wait after an error")
    parser.add_argument("--warmup", type=int, help="requests before the first workload")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="results go to $OUT/goodput-<name>.json; default: the device (cpu, cuda)")
    args = parser.parse_args(argv)
    resolve_defaults(args)
    args.name = args.name or args.device
    if not set(args.workloads) <= set(WORKLOADS):
        parser.error(f"--workloads: of {', '.join(WORKLOADS)}, got {','.join(args.workloads)}")
    slo = Slo(args.ttft_slo_s, args.tpot_slo_ms, args.max_error_share)
    launcher = redis_server = None
    try:
        if args.gateway:
            gateway, pids, metrics_url = args.gateway, {}, args.gateway_metrics
        else:
            if "text-256" in args.workloads and args.text_callers > DEFAULT_MAX_NUM_SEQS and \
                    not any(setting.partition("=")[0].lower() == "max_num_seqs" for setting in args.set):
                args.set.append(f"max_num_seqs={args.text_callers}")
            model = args.model
            if model == "random-12b":
                from bench.e2e import random_12b_dir
                model = str(random_12b_dir())
            log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pixtral-goodput-logs-"))
            log_dir.mkdir(parents=True, exist_ok=True)
            metrics_port = free_port_run(1 + args.decoders + args.vision_workers)
            launcher, redis_server, gateway, _, pids = start_stack(args, model, args.device, metrics_port, log_dir)
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            print(f"the roles' logs: {log_dir}", file=sys.stderr)
        workloads = asyncio.run(run_workloads(args, gateway, pids, GatewayMetrics(metrics_url), slo))
    finally:
        if launcher is not None:
            launcher.stop()
        if redis_server is not None:
            redis_server.stop()
    results = {"device": gpu_name() if args.device == "cuda" else "cpu", "model": args.model, "cpus": os.cpu_count(),
               "slo": asdict(slo), "workloads": workloads, "args": vars(args)}
    if "rate-sweep" in workloads:
        results["goodput_rps"] = workloads["rate-sweep"]["new-images"]["goodput_rps"]
    save(f"goodput-{args.name}", results)
    print_table(workloads, slo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
