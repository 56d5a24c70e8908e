"""Prometheus metrics: the HTTP endpoint every role serves, and the gRPC request counter they share."""

from __future__ import annotations

import logging

from prometheus_client import Counter, start_http_server

log = logging.getLogger(__name__)

GRPC_REQUESTS = Counter("pixtral_grpc_requests_total", "gRPC calls served, by method and final status code",
                        ["method", "code"])


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serves /metrics on `port` from a background thread (0: no endpoint)."""
    if port:
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)
