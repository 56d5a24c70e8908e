"""Decoder metrics, read from the engine at scrape time."""

from __future__ import annotations

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily

from services.decoder.engine import Engine


class EngineCollector:
    def __init__(self, engine: Engine, max_num_seqs: int = 0) -> None:
        self.engine = engine
        self.max_num_seqs = max_num_seqs   # the batch's capacity; 0: unknown, no occupancy

    def collect(self):
        stats = self.engine.stats()
        yield GaugeMetricFamily("pixtral_decoder_running_requests", "Sequences holding KV blocks",
                                value=stats.num_running)
        yield GaugeMetricFamily("pixtral_decoder_waiting_requests", "Requests waiting for a slot (autoscaling)",
                                value=stats.num_waiting)
        used = stats.num_blocks - stats.num_free_blocks
        yield GaugeMetricFamily("pixtral_decoder_kv_cache_usage_ratio", "Share of KV blocks in use (blocks kept "
                                "only by the prefix cache count as free)",
                                value=used / stats.num_blocks if stats.num_blocks else 0.0)
        yield GaugeMetricFamily("pixtral_decoder_batch_size", "Sequences in the latest forward pass",
                                value=stats.last_batch_size)
        if self.max_num_seqs:
            yield GaugeMetricFamily("pixtral_decoder_batch_occupancy_ratio",
                                    "Running sequences over the batch's capacity (--max-num-seqs)",
                                    value=stats.num_running / self.max_num_seqs)
        yield CounterMetricFamily("pixtral_decoder_steps", "Forward passes", value=stats.num_steps)
        yield CounterMetricFamily("pixtral_decoder_generated_tokens", "Tokens sampled",
                                  value=stats.num_generated_tokens)
        yield CounterMetricFamily("pixtral_decoder_computed_tokens", "Tokens run through the model",
                                  value=stats.num_computed_tokens)
        yield CounterMetricFamily("pixtral_decoder_preemptions", "Sequences preempted for KV memory",
                                  value=stats.num_preempted)
        yield CounterMetricFamily("pixtral_decoder_failed_steps", "Forward passes that failed (their streams ended "
                                  "with an error)", value=stats.num_failed_steps)
        yield CounterMetricFamily("pixtral_decoder_prefix_cache_queried_tokens", "Prompt tokens looked up in the "
                                  "prefix cache", value=stats.num_prefix_queried_tokens)
        yield CounterMetricFamily("pixtral_decoder_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the "
                                  "prefix cache (not computed)", value=stats.num_prefix_hit_tokens)
        yield GaugeMetricFamily("pixtral_decoder_prefix_cache_blocks", "KV blocks registered in the prefix cache, "
                                "in use or kept for reuse", value=stats.num_prefix_cached_blocks)
        yield GaugeMetricFamily("pixtral_decoder_prefill_tokens_while_decoding", "Prompt tokens a step with "
                                "decoding streams may prefill now, by --step-time-budget-ms (0: no bound)",
                                value=stats.max_prefill_tokens_while_decoding)
        yield GaugeMetricFamily("pixtral_decoder_engine_healthy", "1 while forward passes work, 0 after a failure "
                                "until one works again", value=float(stats.is_healthy))


def register(engine: Engine, max_num_seqs: int = 0) -> None:
    REGISTRY.register(EngineCollector(engine, max_num_seqs))
