"""Gateway configuration: flags or PIXTRAL_* environment variables, read once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from services.gateway.routing import DEFAULT_LOAD_FACTOR, DEFAULT_LOAD_SLACK, POLICIES
from shared import tls
from shared.role import RoleOptions
from shared.settings import option
from shared.url_fetch import parse_networks


@dataclass(frozen=True)
class GatewayConfig(RoleOptions):
    """Pixtral gateway: the public gRPC API (Chat, Tokenize, PutImages, GetModelInfo) and, with --http-port, the
    OpenAI-compatible HTTP API."""

    port: int = option(50051, "gRPC port")
    metrics_port: int = option(9100, "port of the Prometheus /metrics endpoint; 0: none")
    http_port: int = option(0, "port of the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /tokenize, "
                               "/health) on --host, with the gRPC port's token and TLS; 0: none")
    model_name: str = option("", "name of the model served, as GetModelInfo reports it; empty: the checkpoint "
                                 "directory's name ('tiny' for the built-in model)")
    decoder_addresses: tuple[str, ...] = option(("127.0.0.1:50061",), "decoder addresses host:port, comma-separated")
    max_images: int = option(16, "images per request at most")
    max_image_bytes: int = option(20 * 1024 * 1024, "bytes per image file at most")
    max_image_pixels: int = option(50_000_000, "pixels per image at most (checked from the header)")
    max_model_len: int = option(0, "prompt + max_tokens at most; 0: the smallest context of the decoders (the "
                                   "model's trained context while none has said)")
    default_max_tokens: int = option(256, "max_tokens when a request sets none (capped by the context left)")
    max_stop_strings: int = option(16, "stop strings per request at most")
    max_n: int = option(16, "completions per request (n) at most")
    encode_timeout_s: float = option(120.0, "how long a request waits for its images to be encoded")
    lock_ttl_s: float = option(30.0, "expiry of the single-flight lock on an image being encoded")
    embedding_ttl_s: int = option(0, "expiry a cached embedding gets again each time a request uses it (the vision "
                                     "workers' --embedding-ttl-s, so that images in use stay); 0: left as written")
    max_message_bytes: int = option(64 * 1024 * 1024, "largest request message gRPC accepts")
    image_url_allowlist: tuple[str, ...] = option(
        (), "hosts whose http(s) image URLs the gateway fetches, comma-separated; empty: only data: URLs")
    image_url_allowed_networks: tuple[str, ...] = option(
        (), "non-public networks (CIDR, e.g. 10.0.0.0/8) image URLs may resolve to, for on-prem hosts; "
            "loopback, private, link-local and reserved addresses are refused otherwise")
    image_url_timeout_s: float = option(10.0, "time limit of one image URL fetch, redirects included")
    image_url_max_redirects: int = option(3, "redirects followed per image URL (each target checked again)")
    health_check_interval_s: float = option(1.0, "retry interval of a decoder's health watch after it failed")
    routing: str = option("affinity", "how a request's decoder is chosen: affinity (prompts that start with the same "
                                      "image or the same tokens go to the same decoder, whose prefix cache holds "
                                      "them, unless it is overloaded) or least-busy (the fewest requests in flight)")
    routing_load_factor: float = option(
        DEFAULT_LOAD_FACTOR, "affinity: a decoder takes a request while its load stays within this factor of the "
                             "decoders' average (or the slack), else the next one does")
    routing_load_slack: int = option(
        DEFAULT_LOAD_SLACK, "affinity: a decoder also takes a request while its load is less than this many "
                            "requests above the least loaded one's; 0: the factor alone")
    decoder_info_interval_s: float = option(1.0, "how often each decoder's load and prefix-cache state is read "
                                                 "(its Info), for routing")
    decoder_auth_token: str = option("", "bearer token sent to the decoders; empty: --auth-token", secret=True)
    decoder_tls_ca: str = option("", "PEM CA to verify the decoders with; set: TLS to the decoders")
    decoder_tls_cert: str = option("", "PEM client certificate for the decoders (mutual TLS)")
    decoder_tls_key: str = option("", "PEM private key of --decoder-tls-cert")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"--http-port must be a port or 0, got {self.http_port}")
        if not self.decoder_addresses:
            raise ValueError("--decoder-addresses: at least one decoder address is needed")
        if min(self.max_images, self.max_image_bytes, self.max_image_pixels, self.default_max_tokens, self.max_n) <= 0:
            raise ValueError("image limits, --default-max-tokens and --max-n must be positive")
        if self.encode_timeout_s <= 0 or self.lock_ttl_s <= 0:
            raise ValueError("--encode-timeout-s and --lock-ttl-s must be positive")
        if self.embedding_ttl_s < 0:
            raise ValueError("--embedding-ttl-s must not be negative")
        if self.max_model_len < 0:
            raise ValueError("--max-model-len must not be negative")
        if self.image_url_timeout_s <= 0 or self.image_url_max_redirects < 0 or self.health_check_interval_s <= 0:
            raise ValueError("--image-url-timeout-s and --health-check-interval-s must be positive, "
                             "--image-url-max-redirects not negative")
        if self.routing not in POLICIES:
            raise ValueError(f"--routing must be one of {', '.join(POLICIES)}, got {self.routing!r}")
        if self.routing_load_factor <= 1.0 or self.decoder_info_interval_s <= 0:
            raise ValueError("--routing-load-factor must be above 1, --decoder-info-interval-s positive")
        if self.routing_load_slack < 0:
            raise ValueError(f"--routing-load-slack must not be negative, got {self.routing_load_slack}")
        try:
            parse_networks(self.image_url_allowed_networks)
        except ValueError as error:
            raise ValueError(f"--image-url-allowed-networks: {error}") from None
        tls.check_client_files(self.decoder_tls_ca, self.decoder_tls_cert, self.decoder_tls_key, "--decoder-tls")

    @property
    def decoder_token(self) -> str:
        return self.decoder_auth_token or self.auth_token
