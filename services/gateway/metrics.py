"""Gateway metrics: latency of the token stream and use of the embedding cache.

Requests by method and final status are counted for every role by shared/metrics.py (pixtral_grpc_requests_total).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TIME_TO_FIRST_TOKEN = Histogram(
    "pixtral_gateway_time_to_first_token_seconds", "From the request's arrival to its first token",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.18, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TIME_PER_OUTPUT_TOKEN = Histogram(
    "pixtral_gateway_time_per_output_token_seconds", "Between tokens of one stream",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28))
GENERATED_TOKENS = Counter("pixtral_gateway_generated_tokens_total", "Tokens streamed to clients")
IMAGES = Counter("pixtral_gateway_images_total", "Images of requests, by where the embedding came from",
                 ["source"])
IN_FLIGHT = Gauge("pixtral_gateway_chats_in_flight", "Chat streams open now")
CACHE_LOOKUPS = Counter("pixtral_gateway_cache_lookups_total",
                        "Distinct images of a request looked up in the embedding cache, by result", ["result"])
ENCODE_WAIT = Histogram(
    "pixtral_gateway_encode_wait_seconds", "From enqueuing a request's missing images to all of them being cached",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120))
DECODER_CHOICES = Counter("pixtral_gateway_decoder_choices_total", "Requests sent to a decoder, by why it was "
                          "chosen: affinity (the prompt's own decoder), spilled (that one was over its load bound "
                          "or full), least_busy (--routing least-busy)", ["reason"])
