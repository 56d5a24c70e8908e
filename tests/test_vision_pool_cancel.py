"""A cancelled request never goes on past the vision pool (reliability case 20): whatever moment the cancel
reaches `VisionPool.ensure`, even the one at which the encode it waits for ends, the call ends cancelled rather
than returning, as if nobody had cancelled it, and going on to the decoder.

A unit test of the pool's waiting logic: the cache lookup and the encode job are replaced by ones that answer at
once, so that every point of the wait can be hit by the cancel in turn.
"""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.prompt import PromptImage
from services.gateway.vision_pool import VisionPool
from shared.encode_jobs import EncodeResult


class InstantPool(VisionPool):
    """Every image is missing from the cache, and its encode succeeds as soon as it is asked for."""

    async def probe(self, sha: str):
        return None

    async def _drive(self, image: PromptImage, request_id: str, flight) -> None:
        flight.future.set_result(EncodeResult(image.sha256))
        self._forget(image.sha256, flight)


def images(count: int) -> list[PromptImage]:
    return [PromptImage(f"{i:064x}", b"png", 32, 32, 2, 2, f"images[{i}]") for i in range(count)]


@pytest.mark.parametrize("num_images", [1, 3])
def test_a_cancel_at_any_step_of_ensure_is_never_lost(num_images):
    async def cancel_after(num_steps: int) -> str:
        pool = InstantPool(client=None, fingerprint="f", lock_ttl_s=5.0)
        task = asyncio.create_task(pool.ensure(images(num_images), "r", timeout_s=5.0))
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
