"""Fetches a prompt's image features from the embedding cache (async Redis)."""

from __future__ import annotations

import redis.asyncio as aioredis
import redis.exceptions
import torch

from shared.embedding_cache import CorruptEntry, cache_key, decode_entry
from shared.errors import ImageNotCached, Unavailable


class FeatureStore:
    def __init__(self, client: aioredis.Redis, fingerprint: str, num_columns: int) -> None:
        self.client = client
        self.fingerprint = fingerprint
        self.num_columns = num_columns

    async def fetch(self, images: list[tuple[str, tuple[int, int]]]) -> torch.Tensor:
        """[(sha256, (grid_h, grid_w)), ...] in prompt order -> [sum of grid_h * grid_w, columns] features."""
        distinct = list(dict.fromkeys(sha for sha, _ in images))
        try:
            values = await self.client.mget([cache_key(self.fingerprint, sha) for sha in distinct])
        except redis.exceptions.RedisError as error:
            raise Unavailable(f"embedding cache unreachable: {type(error).__name__}") from error
        by_sha = dict(zip(distinct, values))
        parts = []
        for index, (sha, grid) in enumerate(images):
            value = by_sha[sha]
            if value is None:
                raise ImageNotCached(f"images[{index}]: embedding of image {sha} is not cached", sha)
            try:
                parts.append(decode_entry(value, fingerprint=self.fingerprint, sha256=sha,
                                          num_columns=self.num_columns, grid=grid))
            except CorruptEntry as error:
                raise ImageNotCached(f"images[{index}]: cached embedding of image {sha} is invalid ({error})",
                                     sha) from error
        return torch.cat(parts)
