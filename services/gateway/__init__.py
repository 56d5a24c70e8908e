"""The public gateway: validation, tokenization, image encoding through the pool, streaming from a decoder."""
