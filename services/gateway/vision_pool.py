"""The gateway's side of the vision pool: which images are cached, and getting the others encoded.

Concurrent requests for one new image cause one encode: within a gateway process they share one future; across
gateways the first to take the image's lock (SET NX with an expiry) enqueues the job, the others wait for the
result on the pub/sub channel (with a slow poll of the cache in case a message is missed). If the lock expires
without a result (its holder died), the next waiter takes it and enqueues again.

With `embedding_ttl_s`, every look at a cached embedding (a request using it) gives it that expiry again: an image
in use stays cached, one nobody asks for expires that long after its last use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
import redis.exceptions

from services.gateway import metrics
from services.gateway.prompt import PromptImage
from shared import encode_jobs
from shared.embedding_cache import HEADER_BYTES, CorruptEntry, EntryHeader, cache_key, check_length, parse_header
from shared.encode_jobs import EncodeJob, EncodeResult
from shared.errors import DeadlineExceeded, EncodeFailed, ImageNotCached, InvalidRequest, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EnsureResult:
    num_cached: int    # image occurrences whose embedding was already cached
    num_encoded: int   # image occurrences that had to be encoded (once per distinct image)
    encoded: frozenset[str] = frozenset()   # sha256 of the images that had to be encoded


@dataclass(slots=True)
class _Flight:
    future: asyncio.Future
    task: asyncio.Task | None = None
    num_waiters: int = 0


class VisionPool:
    def __init__(self, client: aioredis.Redis, fingerprint: str, lock_ttl_s: float, poll_s: float = 0.5,
                 embedding_ttl_s: int = 0) -> None:
        self.client = client
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

    async def _listen(self) -> None:
        """Delivers published results to the local waiters; resubscribes after a connection loss."""
        channel = encode_jobs.done_channel(self.fingerprint)
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                async for message in pubsub.listen():
                    try:
                        result = EncodeResult.from_json(message["data"])
                    except (ValueError, KeyError, TypeError):
                        log.warning("ignored a malformed message on %s", channel)
                        continue
                    flight = self._flights.get(result.sha256)
                    if flight is not None and not flight.future.done():
                        flight.future.set_result(result)
            except (redis.exceptions.RedisError, OSError):
                await asyncio.sleep(0.5)   # waiters poll the cache meanwhile
            finally:
                await pubsub.aclose()

    async def probe(self, sha: str) -> EntryHeader | None:
        """The header of a valid cached embedding, or None if missing or invalid."""
        key = cache_key(self.fingerprint, sha)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.getrange(key, 0, HEADER_BYTES - 1).strlen(key)
                if self.embedding_ttl_s:
                    pipe.expire(key, self.embedding_ttl_s)   # no-op on a missing key
                prefix, length, *_ = await pipe.execute()
        except redis.exceptions.RedisError as error:
            raise Unavailable(f"embedding cache unreachable: {type(error).__name__}") from error
        if not prefix:
            return None
        try:
            header = parse_header(prefix, fingerprint=self.fingerprint, sha256=sha)
            check_length(header, length)
        except CorruptEntry as error:
            log.warning("cached embedding of %s is invalid (%s): treated as a miss", sha, error)
            return None
        return header

    async def invalidate(self, sha: str) -> None:
        try:
            await self.client.delete(cache_key(self.fingerprint, sha))
        except redis.exceptions.RedisError as error:
            raise Unavailable(f"embedding cache unreachable: {type(error).__name__}") from error

    async def ensure(self, images: list[PromptImage], request_id: str, timeout_s: float) -> EnsureResult:
        """Makes sure every image of the prompt has a valid cached embedding, encoding the missing ones."""
        missing: dict[str, PromptImage] = {}
        num_cached = 0
        for image in images:
            if image.sha256 in missing:
                num_cached += 1   # its other occurrence is being encoded: this one reuses the result
            elif await self.probe(image.sha256) is not None:
                num_cached += 1
                metrics.CACHE_LOOKUPS.labels("hit").inc()
            elif image.data is None:
                # Sent by reference and evicted since the prompt was built: only its bytes can bring it back.
                raise ImageNotCached(f"{image.field}.sha256: image {image.sha256} is not cached; send its bytes",
                                     image.sha256)
            else:
                missing[image.sha256] = image
                metrics.CACHE_LOOKUPS.labels("miss").inc()
        if missing:
            started = time.monotonic()
            try:
                # Not asyncio.wait_for: on Python 3.11 it returns the result, and loses the cancellation, when the
                # caller is cancelled as the encode ends; the cancelled call would go on to the decoder.
                async with asyncio.timeout(timeout_s):
                    results = await asyncio.gather(
                        *(self._encode(image, request_id) for image in missing.values()))
            except TimeoutError:
                raise DeadlineExceeded(f"images: not encoded within {timeout_s:.1f} s") from None
            metrics.ENCODE_WAIT.observe(time.monotonic() - started)
            for image, result in zip(missing.values(), results):
                if result.error_kind == encode_jobs.INVALID_IMAGE:
                    raise InvalidRequest(f"{image.field}: {result.message}")
                if not result.ok:
                    raise EncodeFailed(f"{image.field}: image {image.sha256}: {result.message}")
        return EnsureResult(num_cached, len(missing), frozenset(missing))

    async def _encode(self, image: PromptImage, request_id: str) -> EncodeResult:
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

    async def _drive(self, image: PromptImage, request_id: str, flight: _Flight) -> None:
        sha, future = image.sha256, flight.future
        lock = encode_jobs.lock_key(self.fingerprint, sha)
        try:
            while not future.done():
                # The lock first, then the look at the cache: a worker writes the embedding before it frees the
                # lock, so an encode that ends before we take the lock is seen here and not enqueued again.
                has_lock = await self._take_lock(lock, request_id)
                result = await self._outcome(sha)
                if result is not None:
                    if has_lock:
                        await self.client.delete(lock)
                    future.set_result(result)
                    break
                if has_lock:
                    job = EncodeJob(sha, self.fingerprint, image.data, request_id)
                    await self.client.xadd(encode_jobs.STREAM, job.to_fields())
                await self._wait(sha, future)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - every waiter gets an answer, whatever went wrong
            if isinstance(error, redis.exceptions.RedisError):
                error = Unavailable(f"embedding cache unreachable: {type(error).__name__}")
            if not future.done():
                future.set_exception(error)
        finally:
            self._forget(sha, flight)

    async def _take_lock(self, lock: str, request_id: str) -> bool:
        return bool(await self.client.set(lock, request_id, nx=True, px=int(self.lock_ttl_s * 1000)))

    async def _outcome(self, sha: str) -> EncodeResult | None:
        """The image's result if there is one yet: a valid cached embedding, or a recent failure."""
        if await self.probe(sha) is not None:
            return EncodeResult(sha)
        failure = await self.client.get(encode_jobs.error_key(self.fingerprint, sha))
        return None if failure is None else EncodeResult.from_json(failure)

    async def _wait(self, sha: str, future: asyncio.Future) -> None:
        """Until the result is published (or found by polling, in case the message was missed), at most one lock
        period."""
        give_up = time.monotonic() + self.lock_ttl_s
        while not future.done() and time.monotonic() < give_up:
            await asyncio.wait([future], timeout=self.poll_s)
            if not future.done():
                result = await self._outcome(sha)
                if result is not None:
                    future.set_result(result)
