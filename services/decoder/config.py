"""Decoder configuration: flags or PIXTRAL_* environment variables, read once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from shared.role import ModelRoleOptions
from shared.settings import option


@dataclass(frozen=True)
class DecoderConfig(ModelRoleOptions):
    """Pixtral decoder worker: continuous batching over a paged KV cache, tokens streamed over gRPC."""

    port: int = option(50061, "gRPC port")
    metrics_port: int = option(9101, "port of the Prometheus /metrics endpoint; 0: none")
    max_num_seqs: int = option(0, "sequences decoded together at most; 0: what the KV cache holds of 2,560-token "
                                  "sequences (an image prompt and its answer), 16 to 256")
    max_num_batched_tokens: int = option(8192, "tokens in one forward pass (chunked-prefill budget)")
    step_time_budget_ms: float = option(0.0, "a step that carries decoding streams prefills only the prompt tokens "
                                             "that fit in this time (as the steps run take; from prefill passes "
                                             "timed at start-up on CUDA), to bound their time per output token; "
                                             "0 (default): no bound")
    max_queued: int = option(256, "requests queued beyond max_num_seqs before RESOURCE_EXHAUSTED")
    max_model_len: int = option(0, "prompt + generated tokens per request; 0: the model's, capped by the KV cache")
    block_size: int = option(16, "tokens per KV-cache block")
    enable_prefix_caching: bool = option(True, "reuse the KV cache of prompt prefixes computed before (same tokens, "
                                                "same images): an image asked about again skips its prefill")
    kv_cache_gib: float = option(0.0, "KV cache size; 0: 0.25 GiB on CPU, what is free after the weights on CUDA")
    kv_cache_dtype: str = option("auto", "KV cache elements: auto (the model's dtype) or fp8 (e4m3 with a scale "
                                         "per token and KV head: 1.94x the tokens in the same memory)")
    quantization: str = option("", "weights: empty (the checkpoint's, in the device's dtype) or fp8 (the decoder "
                                   "layers' projections quantized to e4m3 per channel at load)")
    gpu_memory_utilization: float = option(0.9, "share of the GPU's memory this process may use (CUDA, auto KV)")
    cuda_graphs: bool = option(True, "capture decode steps as CUDA graphs (CUDA only)")
    async_scheduling: bool = option(True, "queue each decode step on the GPU before reading the tokens of the one "
                                          "running, so the host's work overlaps the GPU's (CUDA only)")
    stream_interval: int = option(1, "new tokens a stream's message carries at least, its first and last message "
                                     "excepted: fewer messages, less host time a token at high token rates, tokens "
                                     "reach the caller in runs of this many; 1: each token as it is sampled")
    switch_interval_ms: float = option(0.0, "the interpreter's thread switch interval: how long the engine thread "
                                            "waits at most for the event loop to hand over the GIL; 0: Python's "
                                            "(5 ms)")
    feature_cache_mib: int = option(2048, "image features kept in this decoder's memory for reuse (LRU)")
    max_forward_failures: int = option(3, "forward passes failing in a row before the decoder exits for its "
                                          "supervisor to restart it (NOT_SERVING from the first failure on)")
    fault_forward_file: str = option("", "fault injection, for tests only: while this file exists every forward "
                                         "pass fails; empty (default): off")

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.max_num_batched_tokens, self.block_size, self.max_forward_failures, self.stream_interval) <= 0:
            raise ValueError("--max-num-batched-tokens, --block-size, --max-forward-failures and --stream-interval "
                             "must be positive")
        if min(self.max_num_seqs, self.max_queued, self.max_model_len, self.kv_cache_gib,
               self.step_time_budget_ms, self.switch_interval_ms) < 0:
            raise ValueError("--max-num-seqs, --max-queued, --max-model-len, --kv-cache-gib, "
                             "--step-time-budget-ms and --switch-interval-ms must not be negative")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"--kv-cache-dtype must be auto or fp8, got {self.kv_cache_dtype!r}")
        if self.quantization not in ("", "fp8"):
            raise ValueError(f"--quantization must be empty or fp8, got {self.quantization!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("--gpu-memory-utilization must be in (0, 1]")
