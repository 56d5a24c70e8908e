"""The consumer group stays the size of the pool as workers come and go: a worker removes the consumers of workers
that are gone (idle past --consumer-expiry-s, holding no job), never one that holds a job. (A worker that stops on
SIGTERM leaves the group itself: test_vision_pool_faults.py.)"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from services.vision.config import VisionConfig
from services.vision.worker import VisionWorker
from shared import encode_jobs
from shared.encode_jobs import EncodeJob
from tests.support import RedisServer, wait_until


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


def consumers(client) -> dict[str, int]:
    return {c["name"].decode(): c["pending"] for c in client.xinfo_consumers(encode_jobs.STREAM, encode_jobs.GROUP)}


def test_consumers_of_gone_workers_are_removed_unless_they_hold_a_job(redis_server):
    client = redis_server.client()
    client.xgroup_create(encode_jobs.STREAM, encode_jobs.GROUP, id="0", mkstream=True)
    client.xgroup_createconsumer(encode_jobs.STREAM, encode_jobs.GROUP, "gone-idle")
    client.xadd(encode_jobs.STREAM, EncodeJob("ab" * 32, "f" * 64, b"image", "r1").to_fields())
    client.xreadgroup(encode_jobs.GROUP, "gone-holding", {encode_jobs.STREAM: ">"}, count=1)   # dies with a job
    # gone: idle past the expiry (3 s); "alive", made then, has those 3 s for the clean-up to see it as alive
    wait_until(lambda: min(c["idle"] for c in client.xinfo_consumers(encode_jobs.STREAM, encode_jobs.GROUP)) > 3000,
               30, "the consumers never went idle")
    client.xgroup_createconsumer(encode_jobs.STREAM, encode_jobs.GROUP, "alive")

    async def clean() -> tuple[list[str], list[str]]:
        connection = aioredis.from_url(redis_server.url)
        worker = VisionWorker(connection, encoder=None, fingerprint="f" * 64,
                              config=VisionConfig.load(["--consumer", "cleaner", "--consumer-expiry-s", "3"]))
        try:
            await worker.ensure_group()
            first = await worker.remove_gone_consumers()
            await worker.leave()   # holds no job: gone from the group too
            return first, await worker.remove_gone_consumers()
        finally:
            await connection.aclose()

    removed, removed_again = asyncio.run(clean())
    assert (removed, removed_again) == (["gone-idle"], [])
    assert consumers(client) == {"alive": 0, "gone-holding": 1}, "a consumer holding a job must stay"
    assert client.xpending(encode_jobs.STREAM, encode_jobs.GROUP)["pending"] == 1


def test_consumer_expiry_zero_keeps_every_consumer(redis_server):
    client = redis_server.client()
    client.xgroup_create(encode_jobs.STREAM, encode_jobs.GROUP, id="0", mkstream=True)
    client.xgroup_createconsumer(encode_jobs.STREAM, encode_jobs.GROUP, "old")
    time.sleep(0.1)

    async def run_briefly() -> None:
        connection = aioredis.from_url(redis_server.url)
        worker = VisionWorker(connection, encoder=None, fingerprint="f" * 64, config=VisionConfig.load(
            ["--consumer", "w", "--consumer-expiry-s", "0", "--read-block-ms", "50"]))
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        await asyncio.sleep(0.3)
        stop.set()
        await task
        await connection.aclose()

    asyncio.run(run_briefly())
    assert "old" in consumers(client)   # 0 is 'never', not an expiry of 0 s
