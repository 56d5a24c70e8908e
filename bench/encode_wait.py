"""The gateway's encode wait during a load: its pixtral_gateway_encode_wait_seconds histogram, read from its
metrics endpoint before and after the load, and the waits observed between the two reads (count, mean, and
p50/p99 interpolated within the buckets, as Prometheus's histogram_quantile)."""

from __future__ import annotations

import math

import httpx
from prometheus_client.parser import text_string_to_metric_families

ENCODE_WAIT = "pixtral_gateway_encode_wait_seconds"


def read_histogram(text: str, name: str) -> dict:
    """{"buckets": [(upper bound, cumulative count)...], "count", "sum"} of histogram `name` in a Prometheus text
    exposition; empty buckets when it is absent."""
    histogram = {"buckets": [], "count": 0.0, "sum": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                histogram["buckets"].append((float(sample.labels["le"]), sample.value))
            elif sample.name == f"{name}_count":
                histogram["count"] = sample.value
            elif sample.name == f"{name}_sum":
                histogram["sum"] = sample.value
    histogram["buckets"].sort()
    return histogram


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of cumulative `buckets`, linear within the bucket it falls in (as Prometheus's
    histogram_quantile); in the +Inf bucket: the highest finite bound. None for no observations."""
    if not buckets or not buckets[-1][1]:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def encode_wait(before: dict, after: dict) -> dict:
    """The encode waits observed between two reads of the histogram."""
    earlier = dict(before["buckets"])
    buckets = [(bound, count - earlier.get(bound, 0.0)) for bound, count in after["buckets"]]
    count = after["count"] - before["count"]
    seconds = after["sum"] - before["sum"]
    results = {"encode_wait_count": int(count), "encode_wait_mean_ms": 1000 * seconds / count if count else None}
    for q in (0.5, 0.99):
        value = histogram_quantile(q, buckets)
        results[f"encode_wait_p{int(q * 100)}_ms"] = None if value is None else 1000 * value
    return results


class GatewayMetrics:
    """Reads the gateway's metrics endpoint; without one (url None) every read is None."""

    def __init__(self, url: str | None) -> None:
        self.url = url

    async def read(self) -> dict | None:
        if not self.url:
            return None
        async with httpx.AsyncClient(timeout=10.0) as client:
            response = await client.get(self.url)
        response.raise_for_status()
        return read_histogram(response.text, ENCODE_WAIT)
