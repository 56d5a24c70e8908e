"""The gateway's vision pool where two things happen at once, each at the exact moment that matters:

- a cancel that reaches `VisionPool.encode` as the encode it waits for ends: the call ends cancelled, rather than
  returning as if nobody had cancelled it and going on to the decoder (reliability case 20). The cache lookup and
  the encode are replaced by ones that answer at once, so that every point of the wait can be hit in turn;
- an encode that ends just before a gateway takes the image's lock (a worker writes the embedding, then frees the
  lock): the gateway finds the embedding, enqueues no second job and frees the lock. On a real Redis, the worker's
  side played by the test.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
import torch

from services.gateway.images import ImageFile
from services.gateway.vision_pool import VisionPool
from shared import encode_jobs
from shared.embedding_cache import cache_key, encode_entry
from shared.encode_jobs import EncodeResult


class InstantPool(VisionPool):
    """Every image's encode succeeds as soon as it is asked for."""

    async def _drive(self, image: ImageFile, request_id: str, flight) -> None:
        flight.future.set_result(EncodeResult(image.sha256))
        self._forget(image.sha256, flight)


def images(count: int) -> list[ImageFile]:
    return [ImageFile(f"{i:064x}", b"png", f"images[{i}]") for i in range(count)]


@pytest.mark.parametrize("num_images", [1, 3])
def test_a_cancel_at_any_step_of_encode_is_never_lost(num_images):
    async def cancel_after(num_steps: int) -> str:
        pool = InstantPool(client=None, fingerprint="f", lock_ttl_s=5.0)
        task = asyncio.create_task(pool.encode(images(num_images), "r", timeout_s=5.0))
        for _ in range(num_steps):
            await asyncio.sleep(0)
        if task.done():
            return "returned before the cancel"
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "returned after the cancel"

    async def sweep() -> set[str]:
        return {await cancel_after(num_steps) for num_steps in range(30)}

    assert asyncio.run(sweep()) == {"cancelled", "returned before the cancel"}


class EncodeEndsBeforeTheLockIsTaken(VisionPool):
    """Just before this gateway first takes the image's lock, a worker finishes the image's encode: it writes the
    embedding and frees the lock, as the vision worker does."""

    attempts = 0

    async def _lock_and_look(self, lock: str, sha: str, request_id: str):
        self.attempts += 1
        if self.attempts == 1:
            value = encode_entry(torch.zeros(6, 8), (2, 3), self.fingerprint, sha)
            await self.client.set(cache_key(self.fingerprint, sha), value)
            await self.client.delete(lock)
        return await super()._lock_and_look(lock, sha, request_id)


def test_an_encode_ending_just_before_the_lock_is_taken_is_not_enqueued_again(module_redis):
    async def ensure() -> tuple:
        client = aioredis.Redis.from_url(module_redis.url)   # its own: no worker takes the jobs
        try:
            pool = EncodeEndsBeforeTheLockIsTaken(client, fingerprint="f" * 16, lock_ttl_s=5.0)
            image = ImageFile("ab" * 32, b"png", "images[0]")
            result = await pool.encode([image], "r", timeout_s=5.0)
            jobs = await client.xlen(encode_jobs.STREAM)
            lock = await client.exists(encode_jobs.lock_key(pool.fingerprint, image.sha256))
            return result, jobs, lock
        finally:
            await client.aclose()

    result, jobs, lock = asyncio.run(ensure())
    assert (len(result), jobs, lock) == (1, 0, 0)
