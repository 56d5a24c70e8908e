"""The gateway's side of the vision pool: which images are cached, and getting the others encoded.

Concurrent requests for one new image cause one encode: within a gateway process they share one future; across
gateways the first to take the image's lock (SET NX with an expiry) enqueues the job, the others wait for the
result on the pub/sub channel (with a slow poll of the cache in case a message is missed). If the lock expires
without a result (its holder died), the next waiter takes it and enqueues again.

The lock, the job and the result are the jobs Redis's; the embeddings the cache's (the same Redis by default). On a
Redis Cluster the result comes by sharded pub/sub from the node that serves the job stream's slot
(shared/redis_client.py); a subscription lost in a failover is made again, and the poll covers the gap.

With `embedding_ttl_s`, every look at a cached embedding (a request using it) gives it that expiry again: an image
in use stays cached, one nobody asks for expires that long after its last use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from tenacity import AsyncRetrying, retry_if_result, stop_never

from services.gateway import metrics
from services.gateway.images import ImageFile
from shared import encode_jobs
from shared.cache_probe import probe_entries, queue_probe, read_probe
from shared.embedding_cache import EntryHeader, cache_key
from shared.encode_jobs import EncodeJob, EncodeResult
from shared.errors import DeadlineExceeded, EncodeFailed, InvalidRequest, Unavailable
from shared.redis_client import REDIS_ERRORS, AnyClient, Endpoint, endpoint, messages
from shared.retries import forever, idempotent_redis

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Flight:
    future: asyncio.Future
    task: asyncio.Task | None = None
    num_waiters: int = 0


def _unavailable(error: Exception) -> Unavailable:
    return Unavailable(f"embedding cache unreachable: {type(error).__name__}")


class VisionPool:
    def __init__(self, client: Endpoint | AnyClient | None, fingerprint: str, lock_ttl_s: float, poll_s: float = 0.5,
                 embedding_ttl_s: int = 0, cache: Endpoint | AnyClient | None = None) -> None:
        """`client`: the jobs Redis; `cache`: the embeddings' Redis (default: the same)."""
        self.client = client
        self.jobs = endpoint(client)
        self.cache = self.jobs if cache is None else endpoint(cache)
        self.fingerprint = fingerprint
        self.lock_ttl_s = lock_ttl_s
        self.poll_s = poll_s
        self.embedding_ttl_s = embedding_ttl_s
        self._flights: dict[str, _Flight] = {}
        self._listener: asyncio.Task | None = None

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen())

    async def close(self) -> None:
        if self._listener:
            self._listener.cancel()

    @forever((*REDIS_ERRORS, OSError), first_wait_s=0.5, max_wait_s=5.0)
    async def _listen(self) -> None:
        """Delivers published results to the local waiters; subscribes again after a connection loss (waiters
        poll the cache meanwhile)."""
        channel = encode_jobs.done_channel(self.fingerprint)
        async for data in messages(await self.jobs.client(), channel):
            try:
                result = EncodeResult.from_json(data)
            except (ValueError, KeyError, TypeError):
                log.warning("ignored a malformed message on %s", channel)
                continue
            flight = self._flights.get(result.sha256)
            if flight is not None and not flight.future.done():
                flight.future.set_result(result)

    async def probe(self, shas: list[str]) -> dict[str, EntryHeader | None]:
        """The header of each image's valid cached embedding (None: missing or invalid), in one round trip."""
        try:
            return await probe_entries(self.cache, self.fingerprint, shas, ttl_s=self.embedding_ttl_s)
        except REDIS_ERRORS as error:
            raise _unavailable(error) from error

    async def invalidate(self, sha: str) -> None:
        try:
            await (await self.cache.client()).delete(cache_key(self.fingerprint, sha))
        except REDIS_ERRORS as error:
            raise _unavailable(error) from error

    async def encode(self, images: list[ImageFile], request_id: str, timeout_s: float) -> frozenset[str]:
        """Has each image encoded (distinct images, found missing from the cache); returns their hashes."""
        if not images:
            return frozenset()
        started = time.monotonic()
        try:
            # Not asyncio.wait_for: on Python 3.11 it returns the result, and loses the cancellation, when the
            # caller is cancelled as the encode ends; the cancelled call would go on to the decoder.
            async with asyncio.timeout(timeout_s):
                results = await asyncio.gather(*(self._encode(image, request_id) for image in images))
        except TimeoutError:
            raise DeadlineExceeded(f"images: not encoded within {timeout_s:.1f} s") from None
        metrics.ENCODE_WAIT.observe(time.monotonic() - started)
        for image, result in zip(images, results):
            if result.error_kind == encode_jobs.INVALID_IMAGE:
                raise InvalidRequest(image.field, result.message)
            if not result.ok:
                raise EncodeFailed(f"{image.field}: image {image.sha256}: {result.message}")
        return frozenset(image.sha256 for image in images)

    async def _encode(self, image: ImageFile, request_id: str) -> EncodeResult:
        flight = self._flights.get(image.sha256)
        if flight is None:
            flight = _Flight(asyncio.get_running_loop().create_future())
            self._flights[image.sha256] = flight
            flight.task = asyncio.create_task(self._drive(image, request_id, flight))
        flight.num_waiters += 1
        try:
            return await asyncio.shield(flight.future)
        finally:
            flight.num_waiters -= 1
            if flight.num_waiters == 0 and not flight.future.done():
                # Nobody waits any more: stop driving it, and let the next request for the image start afresh
                # rather than join a flight that is being cancelled (it would wait for a result never set).
                flight.task.cancel()
                self._forget(image.sha256, flight)

    def _forget(self, sha: str, flight: _Flight) -> None:
        if self._flights.get(sha) is flight:
            del self._flights[sha]

    async def _drive(self, image: ImageFile, request_id: str, flight: _Flight) -> None:
        """Until the image has a result: each attempt takes the lock if it is free, enqueues the job if it got it,
        and waits one lock period; an attempt without a result (the lock's holder died) is followed by another."""
        sha, future = image.sha256, flight.future
        try:
            async for attempt in AsyncRetrying(retry=retry_if_result(lambda result: result is None), stop=stop_never):
                with attempt:
                    result = await self._attempt(image, request_id, future)
                if not attempt.retry_state.outcome.failed:
                    attempt.retry_state.set_result(result)
            if not future.done():
                future.set_result(result)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - every waiter gets an answer, whatever went wrong
            if isinstance(error, REDIS_ERRORS):
                error = _unavailable(error)
            if not future.done():
                future.set_exception(error)
        finally:
            self._forget(sha, flight)

    async def _attempt(self, image: ImageFile, request_id: str, future: asyncio.Future) -> EncodeResult | None:
        sha = image.sha256
        lock = encode_jobs.lock_key(self.fingerprint, sha)
        has_lock, result = await self._lock_and_look(lock, sha, request_id)
        jobs = await self.jobs.client()
        if result is not None:
            if has_lock:
                await jobs.delete(lock)
            return result
        if has_lock:
            job = EncodeJob(sha, self.fingerprint, image.data, request_id)
            await jobs.xadd(encode_jobs.STREAM, job.to_fields())
        return await self._wait(sha, future)

    async def _lock_and_look(self, lock: str, sha: str, request_id: str) -> tuple[bool, EncodeResult | None]:
        """Takes the lock if it is free, then looks at the cache and at a recent failure, in that order: a worker
        writes the embedding (or the failure) before it frees the lock, so an encode that ends before we take the
        lock is seen here and not enqueued again. -> (whether we hold the lock, the result if there is one)

        On one plain Redis the two go in one round trip, in order. Elsewhere the look waits for the lock's answer:
        a cluster's pipeline runs its nodes' parts at once, and two Redis servers keep no order between them."""
        jobs, cache = await self.jobs.client(), await self.cache.client()
        set_lock = {"nx": True, "px": int(self.lock_ttl_s * 1000)}
        if cache is jobs and not self.jobs.is_cluster:
            async with jobs.pipeline(transaction=False) as pipe:
                pipe.set(lock, request_id, **set_lock)
                queue_probe(pipe, self.fingerprint, sha, self.embedding_ttl_s)
                pipe.get(encode_jobs.error_key(self.fingerprint, sha))
                has_lock, *probed, failure = await pipe.execute()
            return bool(has_lock), self._result(sha, probed, failure)
        has_lock = await jobs.set(lock, request_id, **set_lock)
        return bool(has_lock), await self._look(sha)

    def _result(self, sha: str, probed: list, failure: bytes | None) -> EncodeResult | None:
        """The image's result if there is one yet: a valid cached embedding, or a recent failure."""
        if read_probe(self.fingerprint, sha, probed) is not None:
            return EncodeResult(sha)
        return None if failure is None else EncodeResult.from_json(failure)

    async def _look(self, sha: str) -> EncodeResult | None:
        """The image's result if there is one yet (see _result): one round trip, or one to each Redis at once."""
        jobs, cache = await self.jobs.client(), await self.cache.client()
        failure_key = encode_jobs.error_key(self.fingerprint, sha)
        if cache is jobs:   # a cluster's pipeline splits it by node
            async with cache.pipeline(transaction=False) as pipe:
                queue_probe(pipe, self.fingerprint, sha, self.embedding_ttl_s)
                pipe.get(failure_key)
                *probed, failure = await pipe.execute()
            return self._result(sha, probed, failure)

        async def probe() -> list:
            async with cache.pipeline(transaction=False) as pipe:
                queue_probe(pipe, self.fingerprint, sha, self.embedding_ttl_s)
                return await pipe.execute()
        probed, failure = await asyncio.gather(probe(), jobs.get(failure_key))
        return self._result(sha, probed, failure)

    @idempotent_redis
    async def _outcome(self, sha: str) -> EncodeResult | None:
        return await self._look(sha)

    async def _wait(self, sha: str, future: asyncio.Future) -> EncodeResult | None:
        """Until the result is published (or found by polling, in case the message was missed), at most one lock
        period; None if there is none by then."""
        give_up = time.monotonic() + self.lock_ttl_s
        while not future.done() and time.monotonic() < give_up:
            await asyncio.wait([future], timeout=self.poll_s)
            if not future.done():
                result = await self._outcome(sha)
                if result is not None:
                    return result
        return future.result() if future.done() else None
