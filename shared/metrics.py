"""Prometheus metrics: the HTTP endpoint every role serves, the gRPC request counter they share, and the stalls of
their event loops."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

GRPC_REQUESTS = Counter("pixtral_grpc_requests_total", "gRPC calls served, by method and final status code",
                        ["method", "code"])


def serve_metrics(port: int, host: str) -> None:
    """Serves /metrics on `host`:`port` (the role's own address) from a background thread (0: no endpoint)."""
    if port:
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)


EVENT_LOOP_LAG = Histogram("pixtral_event_loop_lag_seconds", "How late the event loop ran a wake-up it had asked for "
                           "(a stall holds every call the role serves)",
                           buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
EVENT_LOOP_MAX_LAG = Gauge("pixtral_event_loop_max_lag_seconds", "The longest stall of the event loop so far")


async def watch_event_loop(interval_s: float = 0.01) -> None:
    """Measures the event loop's stalls until cancelled: how late each wake-up every `interval_s` comes."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    while True:
        asked = loop.time()
        await asyncio.sleep(interval_s)
        lag = max(0.0, loop.time() - asked - interval_s)
        EVENT_LOOP_LAG.observe(lag)
        if lag > worst:
            worst = lag
            EVENT_LOOP_MAX_LAG.set(lag)
