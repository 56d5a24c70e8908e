"""The vision worker's loop on a real Redis, with a stand-in encoder (the loop's logic, not the model's):

- it writes an image's embedding, tells its waiters, frees its lock and retires its job in one round trip, all or
  nothing: a write Redis refuses (out of memory) leaves the job pending for a retry and tells nobody it is done;
- it reclaims a dead worker's job while it is kept busy by a steady stream of new jobs (it prepares the next batch
  while one is encoded, and never reclaims while a batch is in hand);
- stopping, it finishes the batch in hand and gives back the one it prepared;
- Redis emptied under it (restarted, flushed), it recreates its consumer group whatever command noticed first."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from services.vision.config import VisionConfig
from services.vision.worker import VisionWorker, group_is_gone
from shared import encode_jobs
from shared.embedding_cache import cache_key
from shared.encode_jobs import EncodeJob, EncodeResult
from shared.images import sha256_hex
from tests.support import RedisServer, image_bytes, noise_image

FINGERPRINT = "f" * 64
SHA = "ab" * 32


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


def take_job(client) -> bytes:
    """A job pending for consumer w, its image's lock held, as when a worker has it in hand."""
    client.xgroup_create(encode_jobs.STREAM, encode_jobs.GROUP, id="0", mkstream=True)
    client.xadd(encode_jobs.STREAM, EncodeJob(SHA, FINGERPRINT, b"image", "r1").to_fields())
    [[_, [(entry_id, _)]]] = client.xreadgroup(encode_jobs.GROUP, "w", {encode_jobs.STREAM: ">"}, count=1)
    client.set(encode_jobs.lock_key(FINGERPRINT, SHA), "gateway")
    return entry_id


def finish(url: str, entry_id: bytes, value: bytes) -> None:
    async def run() -> None:
        connection = aioredis.from_url(url)
        worker = VisionWorker(connection, encoder=None, fingerprint=FINGERPRINT,
                              config=VisionConfig.load(["--consumer", "w", "--embedding-ttl-s", "600"]))
        try:
            await worker._finish(entry_id, FINGERPRINT, EncodeResult(SHA),
                                 embedding=(cache_key(FINGERPRINT, SHA), value))
        finally:
            await connection.aclose()
    asyncio.run(run())


def test_the_embedding_the_done_message_the_lock_and_the_job_go_together(redis_server):
    client = redis_server.client()
    entry_id = take_job(client)
    waiter = client.pubsub(ignore_subscribe_messages=True)
    waiter.subscribe(encode_jobs.done_channel(FINGERPRINT))
    waiter.get_message(timeout=1)
    finish(redis_server.url, entry_id, b"features")
    assert client.get(cache_key(FINGERPRINT, SHA)) == b"features"
    assert 0 < client.ttl(cache_key(FINGERPRINT, SHA)) <= 600
    message = waiter.get_message(timeout=2)
    assert message is not None and EncodeResult.from_json(message["data"]).sha256 == SHA
    assert not client.exists(encode_jobs.lock_key(FINGERPRINT, SHA))
    assert client.xpending(encode_jobs.STREAM, encode_jobs.GROUP)["pending"] == 0
    assert client.xlen(encode_jobs.STREAM) == 0


def test_a_write_redis_refuses_leaves_the_job_pending_and_tells_nobody(redis_server):
    client = redis_server.client()
    entry_id = take_job(client)
    client.config_set("maxmemory-policy", "noeviction")
    limit = int(client.info("memory")["used_memory"]) + (2 << 20)
    client.config_set("maxmemory", str(limit))
    while int(client.info("memory")["used_memory"]) <= limit:   # each write is let in while Redis is under it
        client.append("filler", b"x" * (256 << 10))
    waiter = client.pubsub(ignore_subscribe_messages=True)
    waiter.subscribe(encode_jobs.done_channel(FINGERPRINT))
    waiter.get_message(timeout=1)
    with pytest.raises(redis.exceptions.ResponseError):
        finish(redis_server.url, entry_id, b"features")
    assert client.get(cache_key(FINGERPRINT, SHA)) is None
    assert waiter.get_message(timeout=0.5) is None, "waiters were told of an embedding that was not written"
    assert client.exists(encode_jobs.lock_key(FINGERPRINT, SHA))
    assert client.xpending(encode_jobs.STREAM, encode_jobs.GROUP)["pending"] == 1   # for a retry


class SlowEncoder:
    """Zero features after a fixed delay per batch: a busy device, for the loop's timing."""

    num_columns = 8

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def encode(self, images: list[np.ndarray]) -> list:
        import torch
        time.sleep(self.seconds)
        return [torch.zeros(image.shape[1] // 16 * (image.shape[2] // 16), self.num_columns) for image in images]


def test_a_dead_workers_job_is_reclaimed_while_new_jobs_keep_the_worker_busy(redis_server):
    client = redis_server.client()
    client.xgroup_create(encode_jobs.STREAM, encode_jobs.GROUP, id="0", mkstream=True)
    orphan = image_bytes(noise_image(32, 32, seed=1))
    client.xadd(encode_jobs.STREAM, EncodeJob(sha256_hex(orphan), FINGERPRINT, orphan, "orphan").to_fields())
    client.xreadgroup(encode_jobs.GROUP, "dead", {encode_jobs.STREAM: ">"}, count=1)   # taken, never finished
    feed_s = 4.0

    async def run() -> float | None:
        connection = aioredis.from_url(redis_server.url)
        worker = VisionWorker(connection, SlowEncoder(0.05), FINGERPRINT, VisionConfig.load(
            ["--consumer", "busy", "--claim-idle-ms", "300", "--read-block-ms", "50", "--max-batch-images", "2"]))
        stop = asyncio.Event()
        loop_task = asyncio.create_task(worker.run(stop))
        started = time.monotonic()
        reclaimed_after = None
        for seed in range(1000, 1000 + int(feed_s / 0.02)):   # a new job every 20 ms: never an idle moment
            image = image_bytes(noise_image(32, 32, seed=seed))
            await connection.xadd(encode_jobs.STREAM, EncodeJob(sha256_hex(image), FINGERPRINT, image,
                                                                "feed").to_fields())
            if reclaimed_after is None and await connection.exists(cache_key(FINGERPRINT, sha256_hex(orphan))):
                reclaimed_after = time.monotonic() - started
            await asyncio.sleep(0.02)
        stop.set()
        await loop_task
        await connection.aclose()
        return reclaimed_after

    reclaimed_after = asyncio.run(run())
    assert reclaimed_after is not None, f"the dead worker's job waited for the stream of new jobs to end ({feed_s} s)"
    assert client.xpending(encode_jobs.STREAM, encode_jobs.GROUP)["pending"] == 0


def test_a_stopping_worker_finishes_the_batch_in_hand_and_gives_back_the_one_it_prepared(redis_server):
    client = redis_server.client()
    client.xgroup_create(encode_jobs.STREAM, encode_jobs.GROUP, id="0", mkstream=True)
    images = [image_bytes(noise_image(32, 32, seed=seed)) for seed in (1, 2, 3)]
    for image in images:
        client.xadd(encode_jobs.STREAM, EncodeJob(sha256_hex(image), FINGERPRINT, image, "r").to_fields())

    async def run() -> None:
        connection = aioredis.from_url(redis_server.url)
        worker = VisionWorker(connection, SlowEncoder(1.0), FINGERPRINT, VisionConfig.load(
            ["--consumer", "w", "--read-block-ms", "50", "--max-batch-images", "1"]))
        stop = asyncio.Event()
        loop_task = asyncio.create_task(worker.run(stop))
        give_up = time.monotonic() + 10
        while (await connection.xpending(encode_jobs.STREAM, encode_jobs.GROUP))["pending"] < 2:
            assert time.monotonic() < give_up, "the worker never took a second batch while encoding the first"
            await asyncio.sleep(0.02)
        stop.set()   # first image being encoded, second prepared
        await loop_task
        await connection.aclose()

    asyncio.run(run())
    cached = [bool(client.exists(cache_key(FINGERPRINT, sha256_hex(image)))) for image in images]
    assert cached == [True, False, False]
    assert client.xpending(encode_jobs.STREAM, encode_jobs.GROUP)["pending"] == 0
    left = [EncodeJob.from_fields(fields).sha256 for _, fields in client.xrange(encode_jobs.STREAM)]
    assert sorted(left) == sorted(sha256_hex(image) for image in images[1:]), "jobs 2 and 3 are back for others"


def test_the_loop_survives_its_stream_vanishing_and_takes_jobs_again(redis_server, monkeypatch):
    """Redis emptied under a running worker (its blocked read answers UNBLOCKED, not NOGROUP): the worker recreates
    the group and goes on."""
    from services.vision import worker as worker_module
    monkeypatch.setattr(worker_module, "CLEANUP_INTERVAL_S", 0.0)   # the look for gone consumers on every turn
    client = redis_server.client()
    image = image_bytes(noise_image(32, 32, seed=7))

    async def run() -> None:
        connection = aioredis.from_url(redis_server.url)
        worker = VisionWorker(connection, SlowEncoder(0.0), FINGERPRINT, VisionConfig.load(
            ["--consumer", "w", "--read-block-ms", "50"]))
        stop = asyncio.Event()
        loop_task = asyncio.create_task(worker.run(stop))
        await asyncio.sleep(0.3)
        await connection.flushall()   # as a Redis restarted empty
        await asyncio.sleep(0.3)
        assert not loop_task.done(), f"{type(loop_task.exception()).__name__}: {loop_task.exception()}"
        await connection.xadd(encode_jobs.STREAM, EncodeJob(sha256_hex(image), FINGERPRINT, image, "r").to_fields())
        give_up = time.monotonic() + 10
        while not await connection.exists(cache_key(FINGERPRINT, sha256_hex(image))):
            assert time.monotonic() < give_up and not loop_task.done(), "the job was never taken"
            await asyncio.sleep(0.05)
        stop.set()
        await loop_task
        await connection.aclose()

    asyncio.run(run())
    assert client.xpending(encode_jobs.STREAM, encode_jobs.GROUP)["pending"] == 0


def test_what_an_empty_redis_answers_each_command_of_the_loop_reads_as_the_group_gone(redis_server):
    client = redis_server.client()
    commands = {
        "XINFO CONSUMERS": lambda: client.xinfo_consumers(encode_jobs.STREAM, encode_jobs.GROUP),
        "XAUTOCLAIM": lambda: client.xautoclaim(encode_jobs.STREAM, encode_jobs.GROUP, "w", 0),
        "XREADGROUP": lambda: client.xreadgroup(encode_jobs.GROUP, "w", {encode_jobs.STREAM: ">"}, count=1),
        "XPENDING": lambda: client.xpending_range(encode_jobs.STREAM, encode_jobs.GROUP, "-", "+", 1, "w"),
    }
    for name, command in commands.items():
        with pytest.raises(redis.exceptions.ResponseError) as caught:
            command()
        assert group_is_gone(caught.value), (name, str(caught.value))
