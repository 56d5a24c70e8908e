"""The vision worker loop: take encode jobs from the stream, encode them in batches, write the cache. The next batch
is taken and preprocessed while one is encoded and written.

Any number of workers share the consumer group (consumer_group.py: membership, liveness, taking and retiring
jobs): each job goes to one of them. A job is acknowledged (and its entry deleted) only after its embedding is
written, so a worker killed mid-job leaves it pending, and another worker takes it once the dead worker's heartbeat
has expired (a couple of seconds), or, whatever holds it, once it has been idle for `claim_idle_ms`; a job
delivered more than `max_deliveries` times goes to the dead-letter stream and its waiters get an error.

Workers come and go (autoscaling): one that stops leaves the group, and consumers of workers that died (idle past
`consumer_expiry_s`, nothing pending once their jobs were reclaimed) are removed by the others, so the group's
consumer list stays the size of the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis.exceptions

from services.vision.config import VisionConfig
from services.vision.consumer_group import ConsumerGroup, Entry, group_is_gone
from services.vision.encoder import VisionEncoder
from shared import encode_jobs
from shared.cache_probe import probe_entries
from shared.embedding_cache import cache_key, encode_entry
from shared.encode_jobs import EncodeJob, EncodeResult, MalformedJob
from shared.images import InvalidImage, preprocess
from shared.redis_client import AnyClient, Endpoint, is_unavailable

log = logging.getLogger(__name__)

PATCH_SIZE = 16
CLEANUP_INTERVAL_S = 60.0   # how often a worker looks for consumers of workers that are gone


class InjectedFault(RuntimeError):
    """Raised by the test-only fault injection (VisionConfig.fault_encode_fail_sha256)."""


@dataclass(slots=True)
class WorkerStats:
    num_encoded: int = 0        # images encoded and written
    num_deduplicated: int = 0   # jobs whose embedding was already valid in the cache
    num_invalid: int = 0        # images rejected (not decodable)
    num_dead_lettered: int = 0  # jobs given up after max_deliveries


class VisionWorker:
    def __init__(self, jobs: Endpoint | AnyClient, encoder: VisionEncoder, fingerprint: str, config: VisionConfig,
                 on_encoded: Callable[[int, float], None] = lambda num_images, seconds: None,
                 tokenizer_path: Path | None = None, cache: Endpoint | AnyClient | None = None) -> None:
        """`jobs`: the Redis of the job stream; `cache`: that of the embeddings (default: the same)."""
        self.on_encoded = on_encoded  # (images in the batch, seconds of the forward pass)
        self.encoder = encoder
        self.fingerprint = fingerprint
        self.config = config
        self.tokenizer_path = tokenizer_path   # whose image settings preprocess (shared.tokenizer.tokenizer_file)
        self.consumer = config.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.group = ConsumerGroup(jobs, self.consumer, config, cache)
        self.stats = WorkerStats()

    async def ensure_group(self) -> None:
        await self.group.ensure()

    async def leave(self) -> None:
        await self.group.leave()

    async def remove_gone_consumers(self) -> list[str]:
        return await self.group.remove_gone_consumers()

    async def run(self, stop: asyncio.Event) -> None:
        """Takes, prepares (decode, resize) and encodes batches of jobs until `stop`; the next batch is taken and
        prepared while the one before it is encoded and written, so the device does not wait for the CPU."""
        has_group = False   # (re)created inside the loop: Redis may be away when the worker starts
        has_own_jobs = True   # until looked for: jobs this consumer name held before a restart
        next_cleanup = time.monotonic()
        encoding: asyncio.Task | None = None   # the batch being encoded and written
        next_reclaim = next_look_for_dead = time.monotonic()
        heartbeat = asyncio.create_task(self.group.keep_alive())
        try:
            while not stop.is_set():
                try:
                    if encoding is not None and encoding.done():
                        encoding, done = None, encoding
                        done.result()   # its Redis errors are handled below
                    entries: list[Entry] = []
                    if not has_group:
                        await self.group.ensure()
                        await self.group.beat()   # before taking anything: a live worker's jobs are its own
                        has_group = True
                    if has_own_jobs:
                        entries = await self._deliverable(await self.group.claim_own())
                        has_own_jobs = False
                    if self.config.consumer_expiry_s and time.monotonic() >= next_cleanup:
                        next_cleanup = time.monotonic() + CLEANUP_INTERVAL_S
                        await self.group.remove_gone_consumers()
                    # Jobs of workers whose heartbeat is gone, once per heartbeat interval, batch in hand or not.
                    if not entries and time.monotonic() >= next_look_for_dead:
                        next_look_for_dead = time.monotonic() + self.group.heartbeat_interval_s
                        entries = await self._deliverable(await self.group.claim_of_dead())
                    # Jobs idle past claim_idle_ms are looked for at least four times per claim_idle_ms, never while
                    # a batch is encoded: its jobs are pending, and once idle long enough this worker would claim
                    # them from itself. Under steady load the batch in hand is finished first when one is due.
                    if not entries and encoding is not None and time.monotonic() >= next_reclaim:
                        encoding, previous = None, encoding
                        await previous
                    if not entries and encoding is None:
                        next_reclaim = time.monotonic() + self.config.claim_idle_ms / 4000
                        entries = await self._deliverable(await self.group.claim_idle())
                    entries = entries or await self.group.read()
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
                            await self.group.give_back([(entry_id, job) for entry_id, job, _ in todo[0]])
                        else:
                            encoding = asyncio.create_task(self._encode_and_write(*todo))
                except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as error:
                    # A cluster that is down or moving a slot answers with an error too: unavailable, not refused.
                    if is_unavailable(error):
                        log.warning("redis unavailable (%s: %s); retrying", type(error).__name__, error)
                        await asyncio.sleep(1.0)
                    elif isinstance(error, redis.exceptions.ResponseError) and group_is_gone(error):
                        log.warning("consumer group missing (Redis restarted?): recreating it")
                        has_group = False
                    else:
                        raise
            if encoding is not None:
                await encoding   # the batch in hand is finished before the worker stops
        finally:
            if encoding is not None and not encoding.done():
                encoding.cancel()   # cancelled itself (the grace period is over): its jobs stay pending
            heartbeat.cancel()   # its key expires: whatever this worker still holds goes to the others
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _deliverable(self, entries: list[Entry]) -> list[Entry]:
        """The claimed entries delivered at most max_deliveries times; the others go to the dead-letter stream."""
        kept, exhausted = await self.group.split_by_deliveries(entries)
        for entry_id, fields in exhausted:
            await self._dead_letter(entry_id, fields, f"failed on {self.config.max_deliveries} deliveries")
        for entry_id, _ in kept:
            log.info("reclaimed job %s", entry_id.decode())
        return kept

    async def _dead_letter(self, entry_id: bytes, fields: dict, reason: str) -> None:
        await self.group.dead_letter(entry_id, fields, reason)
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
            log.info("injected delay: a batch of %d images waits %.1f s before its encode", len(todo),
                     self.config.fault_encode_delay_s)
            await asyncio.sleep(self.config.fault_encode_delay_s)
        for _, job, _ in todo:
            if job.sha256 in self.config.fault_encode_fail_sha256:
                raise InjectedFault(f"injected encode failure for image {job.sha256}")

    async def _drop_cached(self, jobs: list[tuple]) -> list[tuple]:
        """Finishes the jobs (entry_id, job, ...) whose image has a valid embedding already; returns the others.
        One round trip for all of them, the gateway's look (shared/cache_probe.py)."""
        if not jobs:
            return jobs
        headers = await probe_entries(self.group.cache, self.fingerprint, [item[1].sha256 for item in jobs],
                                      num_columns=self.encoder.num_columns)
        left = []
        for item in jobs:
            entry_id, job = item[0], item[1]
            if headers[job.sha256] is not None:
                self.stats.num_deduplicated += 1
                await self._finish(entry_id, job.fingerprint, EncodeResult(job.sha256))
            else:
                left.append(item)
        return left

    async def _finish(self, entry_id: bytes, fingerprint: str, result: EncodeResult,
                      embedding: tuple[str, bytes] | None = None) -> None:
        await self.group.finish(entry_id, fingerprint, result, embedding)
