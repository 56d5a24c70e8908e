"""`pixtral-serve`'s settings: what runs (model, roles, ports, devices, Redis) and how it is supervised and stopped;
its flags and `PIXTRAL_*` variables are read from this dataclass (shared/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass

from services.gpu_placement import VISION_PLACEMENTS
from shared.settings import option

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class ServeConfig:
    """Run the whole Pixtral service (gateway, vision workers, decoders, Redis) on this machine."""

    model: str = option("tiny", "checkpoint directory, or 'tiny' for the built-in tiny model")
    redis: str = option("auto", f"Redis URL (plain, or any node of a Redis Cluster) of the cache and the jobs; auto: "
                                f"{LOCAL_REDIS} if it answers, else private ones; private: always two private "
                                "redis-servers, a cache bounded by --cache-memory-mib and one for the jobs")
    cache_memory_mib: int = option(0, "memory of the private cache Redis, which evicts the least recently used "
                                      "embeddings once full; 0: an eighth of this machine's memory")
    vision_workers: int = option(1, "vision worker processes")
    decoders: int = option(1, "decoder processes")
    port: int = option(50051, "gateway port")
    http_port: int = option(8000, "port of the gateway's OpenAI-compatible HTTP API (printed as `http <url>` after "
                                  "`ready`); 0: none")
    device: str = option("cpu", "cpu or cuda")
    gpus: str = option("", "with --device cuda: the GPUs the roles are placed on, as CUDA_VISIBLE_DEVICES names "
                           "them (e.g. 0,1); empty: every GPU visible. One decoder per GPU while there are enough")
    vision_gpus: str = option("shared", "with --device cuda: shared (vision workers on the decoders' GPUs, in turn) "
                                        "or own (on the GPUs no decoder uses)")
    quantization: str = option("", "the decoders' --quantization: empty (the checkpoint's weights) or fp8")
    kv_cache_dtype: str = option("auto", "the decoders' --kv-cache-dtype: auto (the model's dtype) or fp8")
    host: str = option("127.0.0.1", "address the gateway listens on and `ready` prints")
    startup_timeout_s: float = option(900.0, "how long the roles may take to load")
    drain_grace_s: float = option(30.0, "on stop, seconds each role gives its calls and jobs in flight to finish "
                                        "(passed to every role as its --drain-grace-s)")
    grace_s: float = option(10.0, "on stop, seconds a role gets beyond --drain-grace-s to exit before SIGKILL")
    metrics_port: int = option(9100, "Prometheus port of the gateway; the decoders, then the vision workers, get "
                                     "the ports after it, in order; 0: no metrics endpoints")
    max_restarts: int = option(5, "restarts of one child within --restart-window-s; one more crash stops everything")
    restart_window_s: float = option(60.0, "the window --max-restarts counts crashes in")
    restart_backoff_s: float = option(0.5, "delay before a crashed child is started again; doubles with each crash "
                                           f"within the window, up to {MAX_BACKOFF_S:.0f} s")
    auth_token: str = option("", "bearer token of every role (the gateway's callers and its decoder calls); "
                                 "prefer the environment to the flag; empty: none", secret=True)

    def __post_init__(self) -> None:
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"--http-port must be a port or 0, got {self.http_port}")
        if self.vision_workers < 1 or self.decoders < 1:
            raise ValueError("--vision-workers and --decoders must be at least 1")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.vision_gpus not in VISION_PLACEMENTS:
            raise ValueError(f"--vision-gpus must be one of {', '.join(VISION_PLACEMENTS)}, got {self.vision_gpus!r}")
        if self.cache_memory_mib < 0:
            raise ValueError("--cache-memory-mib must not be negative")
        if self.max_restarts < 0 or min(self.drain_grace_s, self.grace_s, self.restart_backoff_s) < 0 or \
                self.restart_window_s <= 0 or not 0 <= self.metrics_port < 65536:
            raise ValueError("--max-restarts, --drain-grace-s, --grace-s and --restart-backoff-s must not be "
                             "negative, --restart-window-s must be positive, --metrics-port a port or 0")
