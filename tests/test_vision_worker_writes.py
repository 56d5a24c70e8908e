"""A vision worker writes an image's embedding, tells its waiters, frees its lock and retires its job in one
round trip, all or nothing: a write Redis refuses (out of memory) leaves the job pending for a retry and tells
nobody that it is done."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from services.vision.config import VisionConfig
from services.vision.worker import VisionWorker
from shared import encode_jobs
from shared.embedding_cache import cache_key
from shared.encode_jobs import EncodeJob, EncodeResult
from tests.support import RedisServer

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
