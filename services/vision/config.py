"""Vision worker configuration: flags or PIXTRAL_* environment variables, read once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from shared.role import ModelRoleOptions
from shared.settings import option


@dataclass(frozen=True)
class VisionConfig(ModelRoleOptions):
    """Pixtral vision worker: encodes images from the job stream into the embedding cache."""

    port: int = option(50071, "gRPC port of the health server")
    metrics_port: int = option(9102, "port of the Prometheus /metrics endpoint; 0: none")
    consumer: str = option("", "name in the consumer group; empty: host-pid")
    max_batch_images: int = option(16, "jobs taken and encoded together at most")
    read_block_ms: int = option(1000, "how long one read of the stream waits for jobs")
    claim_idle_ms: int = option(10000, "a job pending this long (its worker died) is reclaimed")
    heartbeat_interval_ms: int = option(1000, "how often the liveness key is refreshed (expiry: 3 times this)")
    max_deliveries: int = option(3, "deliveries of a job before it goes to the dead-letter stream")
    consumer_expiry_s: int = option(3600, "a consumer of the group idle this long, holding no job, belongs to a "
                                          "worker that is gone and is removed; 0: never")
    max_cuda_graphs: int = option(8, "CUDA graphs kept of the batch shapes encoded most often (cuda only); 0: none")
    max_image_pixels: int = option(50_000_000, "pixels an image may have (checked from its header)")
    embedding_ttl_s: int = option(0, "expiry of cached embeddings (the gateway's --embedding-ttl-s renews it on "
                                     "each use); 0: none (rely on Redis eviction)")
    fault_encode_delay_s: float = option(0.0, "fault injection, for tests only: seconds each batch waits, jobs in "
                                              "hand, before it is encoded; 0 (default): off")
    fault_encode_fail_sha256: tuple[str, ...] = option((), "fault injection, for tests only: images (sha256, "
                                                           "comma-separated) whose encoding always fails; empty "
                                                           "(default): off")

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.fault_encode_delay_s, self.consumer_expiry_s, self.max_cuda_graphs) < 0 or \
                min(self.max_batch_images, self.read_block_ms, self.claim_idle_ms, self.max_deliveries) <= 0:
            raise ValueError("--max-batch-images, --read-block-ms, --claim-idle-ms and --max-deliveries must be "
                             "positive, --fault-encode-delay-s, --consumer-expiry-s and --max-cuda-graphs not negative")
