"""Fetches a prompt's image features: from this decoder's own memory when it used the image recently, else from
the embedding cache in Redis (async): one MGET for the images it lacks (one per node of a Redis Cluster, whose keys
are in many slots).

The local copy (an LRU bounded in bytes, of the values as read from Redis) spares a hot image the Redis round trip
and the validation: 8 MiB for a 1024x1024 image. A key names what made the features (model fingerprint + image
hash), so a local copy never goes stale. It is ordinary memory, not page-locked: allocating page-locked memory waits
for the GPU's queued work, which here, on the event loop, held every other request for the length of a prefill step;
the engine stages the rows through page-locked buffers of its own (model_runner.py).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from shared.embedding_cache import CorruptEntry, cache_key, decode_entry
from shared.errors import ImageNotCached, Unavailable
from shared.redis_client import REDIS_ERRORS, AnyClient, Endpoint, endpoint, read_values
from shared.retries import idempotent_redis


class FeatureStore:
    def __init__(self, client: Endpoint | AnyClient, fingerprint: str, num_columns: int,
                 local_capacity_bytes: int = 0) -> None:
        self.cache = endpoint(client)
        self.fingerprint = fingerprint
        self.num_columns = num_columns
        self.local_capacity_bytes = local_capacity_bytes
        self._local: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._local_bytes = 0
        self.num_local_hits = 0

    def _remember(self, sha: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.local_capacity_bytes:
            return
        self._local[sha] = features
        self._local_bytes += size
        while self._local_bytes > self.local_capacity_bytes:
            _, evicted = self._local.popitem(last=False)
            self._local_bytes -= evicted.numel() * evicted.element_size()

    @idempotent_redis
    async def _read(self, keys: list[str]) -> list[bytes | None]:
        return await read_values(await self.cache.client(), keys)

    async def fetch(self, images: list[tuple[str, tuple[int, int]]]) -> torch.Tensor:
        """[(sha256, (grid_h, grid_w)), ...] in prompt order -> [sum of grid_h * grid_w, columns] features."""
        found: dict[str, torch.Tensor] = {}
        for sha, _ in images:
            if sha in self._local:
                self._local.move_to_end(sha)
                found[sha] = self._local[sha]
                self.num_local_hits += 1
        missing = list(dict.fromkeys(sha for sha, _ in images if sha not in found))
        if missing:
            try:
                values = await self._read([cache_key(self.fingerprint, sha) for sha in missing])
            except REDIS_ERRORS as error:
                raise Unavailable(f"embedding cache unreachable: {type(error).__name__}") from error
            fetched = dict(zip(missing, values))
        parts = []
        for index, (sha, grid) in enumerate(images):
            if sha not in found:
                value = fetched[sha]
                if value is None:
                    raise ImageNotCached(f"images[{index}]: embedding of image {sha} is not cached", sha)
                try:
                    view = decode_entry(value, fingerprint=self.fingerprint, sha256=sha,
                                        num_columns=self.num_columns, grid=grid)
                except CorruptEntry as error:
                    raise ImageNotCached(f"images[{index}]: cached embedding of image {sha} is invalid ({error})",
                                         sha) from error
                # Kept as the view of Redis' bytes, not copied: the engine only reads features (it stages them
                # for the GPU), and a copy here was 8 MiB of memcpy on the event loop for a 1024x1024 image.
                found[sha] = view
                self._remember(sha, found[sha])
            elif found[sha].shape[0] != grid[0] * grid[1]:
                raise ImageNotCached(f"images[{index}]: embedding of image {sha} has another grid", sha)
            parts.append(found[sha])
        return parts[0] if len(parts) == 1 else torch.cat(parts)
