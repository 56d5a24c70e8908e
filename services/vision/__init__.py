"""Vision-encoder workers: take encode jobs from a Redis Stream, write image features to the cache."""
