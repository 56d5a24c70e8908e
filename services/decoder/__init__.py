"""Decoder workers: continuous batching of Pixtral's language model over a paged KV cache."""
