"""Gateway configuration: flags or PIXTRAL_* environment variables, read once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import load_config, option


@dataclass(frozen=True)
class GatewayConfig:
    """Pixtral gateway: the public gRPC API (Chat, Tokenize)."""

    model: str = option("tiny", "checkpoint directory (for its config and vision fingerprint), or 'tiny'")
    redis: str = option("redis://127.0.0.1:6379/0", "Redis URL of the job stream and the embedding cache")
    decoder_addresses: tuple[str, ...] = option(("127.0.0.1:50061",), "decoder addresses host:port, comma-separated")
    host: str = option("0.0.0.0", "address to listen on")
    port: int = option(50051, "gRPC port")
    max_images: int = option(16, "images per request at most")
    max_image_bytes: int = option(20 * 1024 * 1024, "bytes per image file at most")
    max_image_pixels: int = option(50_000_000, "pixels per image at most (checked from the header)")
    max_model_len: int = option(0, "prompt + max_tokens at most; 0: the model's context length")
    default_max_tokens: int = option(256, "max_tokens when a request sets none (capped by the context left)")
    max_stop_strings: int = option(16, "stop strings per request at most")
    encode_timeout_s: float = option(120.0, "how long a request waits for its images to be encoded")
    lock_ttl_s: float = option(30.0, "expiry of the single-flight lock on an image being encoded")
    max_message_bytes: int = option(64 * 1024 * 1024, "largest request message gRPC accepts")
    drain_grace_s: float = option(30.0, "on SIGTERM, seconds streams in flight may take to finish")
    metrics_port: int = option(9100, "port of the Prometheus /metrics endpoint; 0: none")
    log_level: str = option("info", "log level")

    def __post_init__(self) -> None:
        if not self.decoder_addresses:
            raise ValueError("--decoder-addresses: at least one decoder address is needed")
        if min(self.max_images, self.max_image_bytes, self.max_image_pixels, self.default_max_tokens) <= 0:
            raise ValueError("image limits and --default-max-tokens must be positive")
        if self.encode_timeout_s <= 0 or self.lock_ttl_s <= 0:
            raise ValueError("--encode-timeout-s and --lock-ttl-s must be positive")

    @staticmethod
    def load(argv=None) -> GatewayConfig:
        return load_config(GatewayConfig, argv)
