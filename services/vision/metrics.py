"""Vision worker metrics: this worker's counters, and the job stream's depth and lag (for autoscaling), read from
the jobs Redis (plain or a cluster: its client is made at the first scrape Redis answers)."""

from __future__ import annotations

import redis
import redis.cluster
from prometheus_client import Histogram
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily

from services.vision.worker import VisionWorker
from shared import encode_jobs
from shared.redis_client import REDIS_ERRORS, connect_sync

ENCODE_SECONDS = Histogram("pixtral_vision_encode_seconds", "Forward pass of one batch of images",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
BATCH_IMAGES = Histogram("pixtral_vision_batch_images", "Images encoded together", buckets=(1, 2, 4, 8, 16, 32))


class WorkerCollector:
    def __init__(self, worker: VisionWorker, redis_url: str) -> None:
        self.worker = worker
        self.redis_url = redis_url
        self.client: redis.Redis | redis.cluster.RedisCluster | None = None

    def collect(self):
        stats = self.worker.stats
        for name, value, help_text in (
                ("encoded_images", stats.num_encoded, "Images encoded and written"),
                ("deduplicated_jobs", stats.num_deduplicated, "Jobs whose embedding was already cached"),
                ("invalid_images", stats.num_invalid, "Images rejected as undecodable"),
                ("dead_lettered_jobs", stats.num_dead_lettered, "Jobs moved to the dead-letter stream")):
            yield CounterMetricFamily(f"pixtral_vision_{name}", help_text, value=value)
        try:
            if self.client is None:
                self.client = connect_sync(self.redis_url, timeout_s=1.0)
            length = self.client.xlen(encode_jobs.STREAM)
            groups = {g["name"].decode(): g for g in self.client.xinfo_groups(encode_jobs.STREAM)}
        except REDIS_ERRORS:
            return
        group = groups.get(encode_jobs.GROUP, {})
        yield GaugeMetricFamily("pixtral_vision_queue_length", "Entries in the job stream", value=length)
        yield GaugeMetricFamily("pixtral_vision_queue_pending", "Jobs taken by a worker and not yet done",
                                value=group.get("pending", 0))
        yield GaugeMetricFamily("pixtral_vision_queue_lag", "Jobs not yet taken by any worker",
                                value=group.get("lag") or 0)


def observe_batch(num_images: int, seconds: float) -> None:
    BATCH_IMAGES.observe(num_images)
    ENCODE_SECONDS.observe(seconds)


def register(worker: VisionWorker, redis_url: str) -> None:
    REGISTRY.register(WorkerCollector(worker, redis_url))
