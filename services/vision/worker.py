"""The vision worker loop: take encode jobs from the stream, encode them in batches, write the cache. The next batch
is taken and preprocessed while one is encoded and written.

Any number of workers share the consumer group: each job goes to one of them. A job is acknowledged (and its
entry deleted) only after its embedding is written, so a worker killed mid-job leaves it pending and another
worker reclaims it (XAUTOCLAIM) once it has been idle for `claim_idle_ms`; a job delivered more than
`max_deliveries` times goes to the dead-letter stream and its waiters get an error.

Workers come and go (autoscaling): one that stops leaves the group, and consumers of workers that died (idle past
`consumer_expiry_s`, nothing pending once their jobs were reclaimed) are removed by the others, so the group's
consumer list stays the size of the pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis
import redis.exceptions

from services.vision.config import VisionConfig
from services.vision.encoder import VisionEncoder
from shared import encode_jobs
from shared.embedding_cache import CorruptEntry, HEADER_BYTES, cache_key, check_length, encode_entry, parse_header
from shared.encode_jobs import EncodeJob, EncodeResult, MalformedJob
from shared.images import InvalidImage, preprocess

log = logging.getLogger(__name__)

PATCH_SIZE = 16
CLEANUP_INTERVAL_S = 60.0   # how often a worker looks for consumers of workers that are gone


def group_is_gone(error: redis.exceptions.ResponseError) -> bool:
    """Redis restarted empty, or the stream deleted: most commands answer NOGROUP, XINFO "no such key", and a read
    blocked at the time "UNBLOCKED the stream key no longer exists"."""
    text = str(error)
    return "NOGROUP" in text or "no such key" in text or text.startswith("UNBLOCKED")


def retire(pipe, entry_id: bytes):
    """Queues on `pipe` the acknowledgement of a job and the deletion of its stream entry."""
    return pipe.xack(encode_jobs.STREAM, encode_jobs.GROUP, entry_id).xdel(encode_jobs.STREAM, entry_id)


class InjectedFault(RuntimeError):
    """Raised by the test-only fault injection (VisionConfig.fault_encode_fail_sha256)."""


@dataclass(slots=True)
class WorkerStats:
    num_encoded: int = 0        # images encoded and written
    num_deduplicated: int = 0   # jobs whose embedding was already valid in the cache
    num_invalid: int = 0        # images rejected (not decodable)
    num_dead_lettered: int = 0  # jobs given up after max_deliveries


class VisionWorker:
    def __init__(self, client: aioredis.Redis, encoder: VisionEncoder, fingerprint: str, config: VisionConfig,
                 on_encoded: Callable[[int, float], None] = lambda num_images, seconds: None,
                 tokenizer_path: Path | None = None) -> None:
        self.client = client
        self.on_encoded = on_encoded  # (images in the batch, seconds of the forward pass)
        self.encoder = encoder
        self.fingerprint = fingerprint
        self.config = config
        self.tokenizer_path = tokenizer_path   # whose image settings preprocess (shared.tokenizer.tokenizer_file)
        self.consumer = config.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.stats = WorkerStats()

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(encode_jobs.STREAM, encode_jobs.GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        """Takes, prepares (decode, resize) and encodes batches of jobs until `stop`; the next batch is taken and
        prepared while the one before it is encoded and written, so the device does not wait for the CPU."""
        has_group = False   # (re)created inside the loop: Redis may be away when the worker starts
        next_cleanup = time.monotonic()
        encoding: asyncio.Task | None = None   # the batch being encoded and written
        next_reclaim = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    if encoding is not None and encoding.done():
                        encoding, done = None, encoding
                        done.result()   # its Redis errors are handled below
                    if not has_group:
                        await self.ensure_group()
                        has_group = True
                    if self.config.consumer_expiry_s and time.monotonic() >= next_cleanup:
                        next_cleanup = time.monotonic() + CLEANUP_INTERVAL_S
                        await self.remove_gone_consumers()
                    # Jobs of dead workers are looked for at least four times per claim_idle_ms, never while a
                    # batch is encoded: its jobs are pending, and once idle long enough this worker would reclaim
                    # them from itself. Under steady load the batch in hand is finished first when one is due.
                    if encoding is not None and time.monotonic() >= next_reclaim:
                        encoding, previous = None, encoding
                        await previous
                    entries = []
                    if encoding is None:
                        next_reclaim = time.monotonic() + self.config.claim_idle_ms / 4000
                        entries = await self._reclaim()
                    entries = entries or await self._read()
                    if not entries:
                        continue
                    todo = await self._prepare(entries)
                    if encoding is not None:
                        encoding, previous = None, encoding
                        await previous
                        if todo:   # a job enqueued twice (an expired lock) may have been in that batch
                            todo = (await self._drop_cached(todo[0]), todo[1])
                    if todo and todo[0]:
                        if stop.is_set():
                            await self._give_back(todo[0])
                        else:
                            encoding = asyncio.create_task(self._encode_and_write(*todo))
                except redis.exceptions.ResponseError as error:
                    if not group_is_gone(error):
                        raise
                    log.warning("consumer group missing (Redis restarted?): recreating it")
                    has_group = False
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
                    log.warning("redis unavailable (%s); retrying", type(error).__name__)
                    await asyncio.sleep(1.0)
            if encoding is not None:
                await encoding   # the batch in hand is finished before the worker stops
        finally:
            if encoding is not None and not encoding.done():
                encoding.cancel()   # cancelled itself (the grace period is over): its jobs stay pending

    async def leave(self) -> None:
        """Removes this worker from the group, unless it still holds a job (deleting it would drop the job from the
        pending list: it stays, for another worker to reclaim)."""
        if not await self._holds_jobs(self.consumer):
            await self.client.xgroup_delconsumer(encode_jobs.STREAM, encode_jobs.GROUP, self.consumer)
            log.info("left the consumer group")

    async def remove_gone_consumers(self) -> list[str]:
        """Removes the consumers of workers that are gone: idle past consumer_expiry_s (a live worker reads every
        read_block_ms) and holding no job. Returns their names."""
        removed = []
        for consumer in await self.client.xinfo_consumers(encode_jobs.STREAM, encode_jobs.GROUP):
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
            if name == self.consumer or consumer["idle"] < self.config.consumer_expiry_s * 1000 or consumer["pending"]:
                continue
            await self.client.xgroup_delconsumer(encode_jobs.STREAM, encode_jobs.GROUP, name)
            removed.append(name)
        if removed:
            log.info("removed consumers of workers that are gone: %s", ", ".join(removed))
        return removed

    async def _holds_jobs(self, consumer: str) -> bool:
        return bool(await self.client.xpending_range(encode_jobs.STREAM, encode_jobs.GROUP, min="-", max="+",
                                                     count=1, consumername=consumer))

    async def _read(self) -> list[tuple[bytes, dict]]:
        response = await self.client.xreadgroup(encode_jobs.GROUP, self.consumer, {encode_jobs.STREAM: ">"},
                                                count=self.config.max_batch_images, block=self.config.read_block_ms)
        return [entry for _, entries in response or [] for entry in entries if entry[1]]

    async def _reclaim(self) -> list[tuple[bytes, dict]]:
        """Jobs of dead workers; those delivered too often go to the dead-letter stream instead."""
        _, entries, _ = await self.client.xautoclaim(
            encode_jobs.STREAM, encode_jobs.GROUP, self.consumer, min_idle_time=self.config.claim_idle_ms,
            start_id="0-0", count=self.config.max_batch_images)
        entries = [entry for entry in entries if entry[1]]
        if not entries:
            return []
        pending = await self.client.xpending_range(encode_jobs.STREAM, encode_jobs.GROUP, min=entries[0][0],
                                                   max=entries[-1][0], count=len(entries) * 2,
                                                   consumername=self.consumer)
        deliveries = {item["message_id"]: item["times_delivered"] for item in pending}
        kept = []
        for entry_id, fields in entries:
            if deliveries.get(entry_id, 0) > self.config.max_deliveries:
                await self._dead_letter(entry_id, fields, f"failed on {self.config.max_deliveries} deliveries")
            else:
                log.info("reclaimed job %s", entry_id.decode())
                kept.append((entry_id, fields))
        return kept

    async def _dead_letter(self, entry_id: bytes, fields: dict, reason: str) -> None:
        sha = fields.get(b"sha256", b"").decode(errors="replace")
        log.error("job %s (image %s) to the dead-letter stream: %s", entry_id.decode(), sha, reason)
        record = {k: v for k, v in fields.items() if k != b"image"}
        record.update({b"entry_id": entry_id, b"reason": reason.encode()})
        await self.client.xadd(encode_jobs.DEAD_LETTER_STREAM, record, maxlen=10000, approximate=True)
        fingerprint = fields.get(b"fingerprint", b"").decode(errors="replace")
        if sha and fingerprint:
            await self._finish(entry_id, fingerprint,
                               EncodeResult(sha, encode_jobs.FAILED, f"encoding failed: {reason}"))
        else:
            await self._ack(entry_id)
        self.stats.num_dead_lettered += 1

    async def _prepare(self, entries: list[tuple[bytes, dict]]
                       ) -> tuple[list[tuple[bytes, EncodeJob, np.ndarray]], float] | None:
        """Finishes the jobs that need no encode (malformed, other model, already cached, undecodable) and
        preprocesses the others -> (jobs with their pixels, seconds of preprocessing), or None if none is left."""
        jobs: list[tuple[bytes, EncodeJob]] = []
        for entry_id, fields in entries:
            try:
                job = EncodeJob.from_fields(fields)
            except MalformedJob as error:
                await self._dead_letter(entry_id, fields, str(error))
                continue
            if job.fingerprint != self.fingerprint:
                await self._finish(entry_id, job.fingerprint, EncodeResult(
                    job.sha256, encode_jobs.FAILED, "vision worker serves another model version"))
            else:
                jobs.append((entry_id, job))
        jobs = await self._drop_cached(jobs)
        # Decoding and resizing run in threads (PIL and OpenCV release the GIL), all images of the batch at once.
        started = time.perf_counter()
        results = await asyncio.gather(*(asyncio.to_thread(preprocess, job.image, self.config.max_image_pixels,
                                                           self.tokenizer_path)
                                         for _, job in jobs), return_exceptions=True)
        todo: list[tuple[bytes, EncodeJob, np.ndarray]] = []
        for (entry_id, job), result in zip(jobs, results):
            if isinstance(result, InvalidImage):
                self.stats.num_invalid += 1
                await self._finish(entry_id, job.fingerprint,
                                   EncodeResult(job.sha256, encode_jobs.INVALID_IMAGE, str(result)))
            elif isinstance(result, BaseException):
                log.error("preprocessing image %s failed (%s); the job stays pending for a retry", job.sha256,
                          type(result).__name__, extra={"request_id": job.request_id})
            else:
                todo.append((entry_id, job, result))
        return (todo, time.perf_counter() - started) if todo else None

    async def _encode_and_write(self, todo: list[tuple[bytes, EncodeJob, np.ndarray]],
                                preprocess_s: float = 0.0) -> None:
        try:
            await self._inject_faults(todo)
            started = time.perf_counter()
            features = await asyncio.to_thread(self.encoder.encode, [pixels for _, _, pixels in todo])
            encoded = time.perf_counter()
            self.on_encoded(len(todo), encoded - started)
        except Exception:  # noqa: BLE001 - isolate the failing image: encode one at a time
            if len(todo) > 1:
                for item in todo:
                    await self._encode_and_write([item])
                return
            log.exception("encoding image %s failed; the job stays pending for a retry", todo[0][1].sha256,
                          extra={"request_id": todo[0][1].request_id})
            return
        for (entry_id, job, pixels), feats in zip(todo, features, strict=True):
            grid = (pixels.shape[1] // PATCH_SIZE, pixels.shape[2] // PATCH_SIZE)
            value = encode_entry(feats, grid, self.fingerprint, job.sha256)
            # logged before the waiters are told, so that whoever is told can find the line
            log.info("encoded image %s (%dx%d patches) for %s", job.sha256, *grid, job.request_id,
                     extra={"request_id": job.request_id})
            await self._finish(entry_id, job.fingerprint, EncodeResult(job.sha256),
                               embedding=(cache_key(self.fingerprint, job.sha256), value))
            self.stats.num_encoded += 1
        log.info("batch of %d images: preprocessed in %.1f ms, encoded in %.1f ms, written in %.1f ms", len(todo),
                 1000 * preprocess_s, 1000 * (encoded - started), 1000 * (time.perf_counter() - encoded))

    async def _inject_faults(self, todo: list[tuple[bytes, EncodeJob, np.ndarray]]) -> None:
        """Test-only faults (VisionConfig.fault_*, off by default): a slow encode, and images that never encode."""
        if self.config.fault_encode_delay_s:
            await asyncio.sleep(self.config.fault_encode_delay_s)
        for _, job, _ in todo:
            if job.sha256 in self.config.fault_encode_fail_sha256:
                raise InjectedFault(f"injected encode failure for image {job.sha256}")

    async def _drop_cached(self, jobs: list[tuple]) -> list[tuple]:
        """Finishes the jobs (entry_id, job, ...) whose image has a valid embedding already; returns the others.
        One round trip for all of them."""
        if not jobs:
            return jobs
        async with self.client.pipeline(transaction=False) as pipe:
            for _, job, *_ in jobs:
                key = cache_key(self.fingerprint, job.sha256)
                pipe.getrange(key, 0, HEADER_BYTES - 1).strlen(key)
            replies = await pipe.execute()
        left = []
        for index, item in enumerate(jobs):
            entry_id, job = item[0], item[1]
            if self._is_valid(job.sha256, *replies[2 * index:2 * index + 2]):
                self.stats.num_deduplicated += 1
                await self._finish(entry_id, job.fingerprint, EncodeResult(job.sha256))
            else:
                left.append(item)
        return left

    def _is_valid(self, sha: str, prefix: bytes, length: int) -> bool:
        if not prefix:
            return False
        try:
            check_length(parse_header(prefix, fingerprint=self.fingerprint, sha256=sha,
                                      num_columns=self.encoder.num_columns), length)
        except CorruptEntry as error:
            log.warning("cached embedding of %s is invalid (%s): re-encoding", sha, error)
            return False
        return True

    async def _give_back(self, todo: list[tuple[bytes, EncodeJob, np.ndarray]]) -> None:
        """Jobs taken but not started when the worker stops go back to the stream for the other workers: a copy
        at its end, this delivery retired (left pending, they would wait claim_idle_ms to be reclaimed)."""
        async with self.client.pipeline(transaction=True) as pipe:
            for entry_id, job, _ in todo:
                pipe.xadd(encode_jobs.STREAM, job.to_fields())
                retire(pipe, entry_id)
            await pipe.execute()
        log.info("gave back %d jobs taken but not started", len(todo))

    async def _finish(self, entry_id: bytes, fingerprint: str, result: EncodeResult,
                      embedding: tuple[str, bytes] | None = None) -> None:
        """Writes the embedding (key, value) if given, tells the waiters (who listen under the job's fingerprint),
        releases the lock and retires the job: one round trip, all or nothing (a write Redis refuses, out of
        memory, leaves the job pending for a retry and tells nobody it is done)."""
        async with self.client.pipeline(transaction=True) as pipe:
            if embedding is not None:
                pipe.set(*embedding, ex=self.config.embedding_ttl_s or None)
            if not result.ok:
                pipe.set(encode_jobs.error_key(fingerprint, result.sha256), result.to_json(),
                         ex=encode_jobs.ERROR_TTL_S)
            pipe.publish(encode_jobs.done_channel(fingerprint), result.to_json())
            pipe.delete(encode_jobs.lock_key(fingerprint, result.sha256))
            retire(pipe, entry_id)
            await pipe.execute()

    async def _ack(self, entry_id: bytes) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            await retire(pipe, entry_id).execute()
