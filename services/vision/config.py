"""Vision worker configuration: flags or PIXTRAL_* environment variables, read once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from shared import tls
from shared.settings import load_config, option


@dataclass(frozen=True)
class VisionConfig:
    """Pixtral vision worker: encodes images from the job stream into the embedding cache."""

    model: str = option("tiny", "checkpoint directory, or 'tiny' for the built-in tiny model")
    redis: str = option("redis://127.0.0.1:6379/0", "Redis URL of the job stream and the embedding cache")
    device: str = option("cpu", "cpu or cuda")
    host: str = option("0.0.0.0", "address of the health server")
    port: int = option(50071, "gRPC port of the health server")
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
    redis_timeout_s: float = option(5.0, "time limit of one Redis command (a blocking read: --read-block-ms more)")
    drain_grace_s: float = option(30.0, "on SIGTERM, seconds the job in hand may take to finish")
    metrics_port: int = option(9102, "port of the Prometheus /metrics endpoint; 0: none")
    torch_threads: int = option(0, "CPU threads of torch's operators; 0: torch's default (all cores)")
    log_level: str = option("info", "log level")
    auth_token: str = option("", "bearer token every call but health must carry; prefer the environment to the "
                                 "flag, which process lists show; empty: none", secret=True)
    tls_cert: str = option("", "PEM certificate (chain) of the health port; with --tls-key: serve TLS")
    tls_key: str = option("", "PEM private key of --tls-cert")
    tls_client_ca: str = option("", "PEM CA that must have signed client certificates (mutual TLS)")
    fault_encode_delay_s: float = option(0.0, "fault injection, for tests only: seconds each batch waits, jobs in "
                                              "hand, before it is encoded; 0 (default): off")
    fault_encode_fail_sha256: tuple[str, ...] = option((), "fault injection, for tests only: images (sha256, "
                                                           "comma-separated) whose encoding always fails; empty "
                                                           "(default): off")

    def __post_init__(self) -> None:
        tls.check_server_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if min(self.fault_encode_delay_s, self.consumer_expiry_s, self.max_cuda_graphs) < 0 or \
                self.redis_timeout_s <= 0:
            raise ValueError("--redis-timeout-s must be positive, --fault-encode-delay-s, --consumer-expiry-s and "
                             "--max-cuda-graphs not negative")
        if min(self.max_batch_images, self.read_block_ms, self.claim_idle_ms, self.max_deliveries) <= 0:
            raise ValueError("--max-batch-images, --read-block-ms, --claim-idle-ms and --max-deliveries "
                             "must be positive")

    @staticmethod
    def load(argv=None) -> VisionConfig:
        return load_config(VisionConfig, argv)
