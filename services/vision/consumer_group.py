"""A vision worker's side of the job stream's consumer group: membership, liveness, taking jobs, retiring them.

- Membership: the group is created by whoever comes first; a worker that stops leaves it; the consumers of workers
  that are gone (idle past `consumer_expiry_s`, holding nothing) are removed by the others.
- Liveness: each worker refreshes a heartbeat key (`encode_jobs.heartbeat_key`) every `heartbeat_interval_ms` from
  its event loop, which stays free while a batch encodes in a thread; the key expires after
  HEARTBEATS_PER_EXPIRY intervals. The jobs of a consumer whose key is gone are taken by another worker at once,
  a couple of seconds after its death rather than `claim_idle_ms` after its last delivery. A worker that is only
  slow keeps its key, and its jobs are left to it until they are idle for `claim_idle_ms`, as before.
- Taking: new jobs (XREADGROUP), the jobs this consumer name held when its previous process died (at start), the
  jobs of dead consumers, and any job idle past `claim_idle_ms` (XAUTOCLAIM). Each delivery counts: the worker
  sends a job delivered more than `max_deliveries` times to the dead-letter stream.
- Retiring: a finished job's waiters' message, its lock and its entry go in one transaction on the jobs Redis.
  Its embedding goes in the same transaction when the cache is the same plain Redis; when the cache is another
  Redis, or a cluster (where the embedding's slot is not the stream's), it is written first, on its own: a worker
  that dies between the two steps leaves its job pending, with the embedding written and the lock held; the job is
  reclaimed (heartbeat gone), the worker that takes it finds the embedding (it looks at the cache before it
  encodes) and finishes the job without a second encode. Waiters polling the cache meanwhile find the embedding.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import redis.exceptions

from services.vision.config import VisionConfig
from shared import encode_jobs
from shared.encode_jobs import EncodeJob, EncodeResult
from shared.redis_client import REDIS_ERRORS, AnyClient, Endpoint, endpoint, is_cluster_client, publish

log = logging.getLogger(__name__)

# A heartbeat key outlives this many refreshes: one late refresh (a busy host) does not make a live worker look dead.
HEARTBEATS_PER_EXPIRY = 3

Entry = tuple[bytes, dict]   # (stream entry id, fields)

# Takes the pending jobs of one consumer, all in one step: two workers that both find it dead never take the same
# job, and a consumer whose heartbeat came back in the meantime keeps its jobs. (Its two keys share a slot.)
# KEYS: stream, heartbeat key of the owner. ARGV: group, owner, taker, count, 1 to take only if the heartbeat is gone.
_CLAIM_PENDING_OF = """
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return {} end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[4]), ARGV[2])
if #pending == 0 then return {} end
local ids = {}
for i, entry in ipairs(pending) do ids[i] = entry[1] end
return redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, unpack(ids))
"""


def group_is_gone(error: redis.exceptions.ResponseError) -> bool:
    """Redis restarted empty, or the stream deleted: most commands answer NOGROUP, XINFO "no such key", and a read
    blocked at the time "UNBLOCKED the stream key no longer exists"."""
    text = str(error)
    return "NOGROUP" in text or "no such key" in text or text.startswith("UNBLOCKED")


def retire(pipe, entry_id: bytes):
    """Queues on `pipe` the acknowledgement of a job and the deletion of its stream entry."""
    return pipe.xack(encode_jobs.STREAM, encode_jobs.GROUP, entry_id).xdel(encode_jobs.STREAM, entry_id)


def _name(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ConsumerGroup:
    """`jobs`: the Redis of the job stream; `cache`: that of the embeddings (default: the same)."""

    def __init__(self, jobs: Endpoint | AnyClient, consumer: str, config: VisionConfig,
                 cache: Endpoint | AnyClient | None = None) -> None:
        if config.heartbeat_interval_ms <= 0:
            raise ValueError("--heartbeat-interval-ms must be positive")
        self.jobs = endpoint(jobs)
        self.cache = self.jobs if cache is None else endpoint(cache)
        self.consumer = consumer
        self.config = config
        self.heartbeat_interval_s = config.heartbeat_interval_ms / 1000
        self._heartbeat_key = encode_jobs.heartbeat_key(consumer)

    # -- membership ---------------------------------------------------------------------------------------------

    async def ensure(self) -> None:
        try:
            await (await self.jobs.client()).xgroup_create(encode_jobs.STREAM, encode_jobs.GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def leave(self) -> None:
        """Ends this worker's heartbeat (any job it still holds is taken by another worker at once) and removes it
        from the group, unless it still holds a job (deleting it would drop the job from the pending list)."""
        client = await self.jobs.client()
        await client.delete(self._heartbeat_key)
        if not await self._holds_jobs(self.consumer):
            await client.xgroup_delconsumer(encode_jobs.STREAM, encode_jobs.GROUP, self.consumer)
            log.info("left the consumer group")

    async def remove_gone_consumers(self) -> list[str]:
        """Removes the consumers of workers that are gone: idle past consumer_expiry_s (a live worker reads every
        read_block_ms) and holding no job. Returns their names."""
        removed = []
        client = await self.jobs.client()
        for consumer in await client.xinfo_consumers(encode_jobs.STREAM, encode_jobs.GROUP):
            name = _name(consumer["name"])
            if name == self.consumer or consumer["idle"] < self.config.consumer_expiry_s * 1000 or consumer["pending"]:
                continue
            await client.xgroup_delconsumer(encode_jobs.STREAM, encode_jobs.GROUP, name)
            removed.append(name)
        if removed:
            log.info("removed consumers of workers that are gone: %s", ", ".join(removed))
        return removed

    async def _holds_jobs(self, consumer: str) -> bool:
        client = await self.jobs.client()
        return bool(await client.xpending_range(encode_jobs.STREAM, encode_jobs.GROUP, min="-", max="+", count=1,
                                                consumername=consumer))

    # -- liveness -----------------------------------------------------------------------------------------------

    async def beat(self) -> None:
        expiry_ms = HEARTBEATS_PER_EXPIRY * self.config.heartbeat_interval_ms
        await (await self.jobs.client()).set(self._heartbeat_key, f"{socket.gethostname()}:{os.getpid()}",
                                             px=expiry_ms)

    async def keep_alive(self) -> None:
        """Refreshes the heartbeat until cancelled; a Redis that does not answer is tried again next time."""
        while True:
            try:
                await self.beat()
            except REDIS_ERRORS as error:
                log.debug("heartbeat not refreshed (%s)", type(error).__name__)
            await asyncio.sleep(self.heartbeat_interval_s)

    # -- taking jobs --------------------------------------------------------------------------------------------

    async def read(self) -> list[Entry]:
        client = await self.jobs.client()
        response = await client.xreadgroup(encode_jobs.GROUP, self.consumer, {encode_jobs.STREAM: ">"},
                                           count=self.config.max_batch_images, block=self.config.read_block_ms)
        return [entry for _, entries in response or [] for entry in entries if entry[1]]

    async def claim_own(self) -> list[Entry]:
        """The jobs this consumer name held when its previous process died (a restarted worker): taken up at
        once, before its heartbeat or claim_idle_ms would hand them to someone."""
        entries = await self._claim_of(self.consumer, only_if_dead=False)
        if entries:
            log.info("took up %d jobs this consumer held before its restart", len(entries))
        return entries

    async def claim_of_dead(self) -> list[Entry]:
        """Jobs held by consumers whose heartbeat is gone (their workers died), up to max_batch_images."""
        client = await self.jobs.client()
        summary = await client.xpending(encode_jobs.STREAM, encode_jobs.GROUP)
        holders = [_name(c["name"]) for c in summary.get("consumers") or () if _name(c["name"]) != self.consumer]
        if not holders:
            return []
        async with client.pipeline(transaction=False) as pipe:
            for name in holders:
                pipe.exists(encode_jobs.heartbeat_key(name))
            alive = await pipe.execute()
        entries: list[Entry] = []
        for name, is_alive in zip(holders, alive):
            if is_alive or len(entries) >= self.config.max_batch_images:
                continue
            taken = await self._claim_of(name, only_if_dead=True,
                                         count=self.config.max_batch_images - len(entries))
            if taken:
                log.info("consumer %s has no heartbeat (its worker died): took its %d jobs", name, len(taken))
            entries += taken
        return entries

    async def claim_idle(self) -> list[Entry]:
        """Jobs pending for longer than claim_idle_ms, whoever holds them."""
        _, entries, _ = await (await self.jobs.client()).xautoclaim(
            encode_jobs.STREAM, encode_jobs.GROUP, self.consumer, min_idle_time=self.config.claim_idle_ms,
            start_id="0-0", count=self.config.max_batch_images)
        return [entry for entry in entries if entry[1]]

    async def _claim_of(self, owner: str, only_if_dead: bool, count: int | None = None) -> list[Entry]:
        client = await self.jobs.client()
        reply = await client.register_script(_CLAIM_PENDING_OF)(
            keys=[encode_jobs.STREAM, encode_jobs.heartbeat_key(owner)],
            args=[encode_jobs.GROUP, owner, self.consumer, count or self.config.max_batch_images,
                  1 if only_if_dead else 0])
        # XCLAIM inside a script answers [id, [field, value, ...]] pairs; an entry deleted meanwhile is left out
        return [(entry_id, dict(zip(flat[::2], flat[1::2]))) for entry_id, flat in reply or () if flat]

    async def split_by_deliveries(self, entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
        """(entries delivered at most max_deliveries times, the others) of entries this consumer holds."""
        if not entries:
            return [], []
        async with (await self.jobs.client()).pipeline(transaction=False) as pipe:
            for entry_id, _ in entries:
                pipe.xpending_range(encode_jobs.STREAM, encode_jobs.GROUP, min=entry_id, max=entry_id, count=1,
                                    consumername=self.consumer)
            replies = await pipe.execute()
        deliveries = {item["message_id"]: item["times_delivered"] for reply in replies for item in reply}
        kept, exhausted = [], []
        for entry in entries:
            (exhausted if deliveries.get(entry[0], 0) > self.config.max_deliveries else kept).append(entry)
        return kept, exhausted

    # -- retiring jobs ------------------------------------------------------------------------------------------

    async def finish(self, entry_id: bytes, fingerprint: str, result: EncodeResult,
                     embedding: tuple[str, bytes] | None = None) -> None:
        """Writes the embedding (key, value) if given, tells the waiters (who listen under the job's fingerprint),
        releases the lock and retires the job, all or nothing: a write Redis refuses (out of memory) leaves the job
        pending for a retry and tells nobody it is done. With the cache elsewhere (another Redis, or a cluster's
        other slots) the embedding is written first, and only once it is the rest follows (module docstring)."""
        jobs, cache = await self.jobs.client(), await self.cache.client()
        if embedding is not None and (cache is not jobs or is_cluster_client(jobs)):
            await cache.set(*embedding, ex=self.config.embedding_ttl_s or None)
            embedding = None
        await self._retire_done(jobs, entry_id, fingerprint, result, embedding)

    async def _retire_done(self, jobs: AnyClient, entry_id: bytes, fingerprint: str, result: EncodeResult,
                           embedding: tuple[str, bytes] | None) -> None:
        """The transaction of `finish` on the jobs Redis (with the embedding when it goes there too)."""
        is_cluster = is_cluster_client(jobs)
        async with jobs.pipeline(transaction=True) as pipe:
            if embedding is not None:
                pipe.set(*embedding, ex=self.config.embedding_ttl_s or None)
            if not result.ok:
                pipe.set(encode_jobs.error_key(fingerprint, result.sha256), result.to_json(),
                         ex=encode_jobs.ERROR_TTL_S)
            publish(pipe, encode_jobs.done_channel(fingerprint), result.to_json(), is_cluster)
            pipe.delete(encode_jobs.lock_key(fingerprint, result.sha256))
            retire(pipe, entry_id)
            await pipe.execute()

    async def dead_letter(self, entry_id: bytes, fields: dict, reason: str) -> None:
        """Moves a job to the dead-letter stream (without its image) and tells its waiters it failed."""
        sha = fields.get(b"sha256", b"").decode(errors="replace")
        log.error("job %s (image %s) to the dead-letter stream: %s", entry_id.decode(), sha, reason)
        record = {k: v for k, v in fields.items() if k != b"image"}
        record.update({b"entry_id": entry_id, b"reason": reason.encode()})
        client = await self.jobs.client()
        await client.xadd(encode_jobs.DEAD_LETTER_STREAM, record, maxlen=10000, approximate=True)
        fingerprint = fields.get(b"fingerprint", b"").decode(errors="replace")
        if sha and fingerprint:
            await self.finish(entry_id, fingerprint,
                              EncodeResult(sha, encode_jobs.FAILED, f"encoding failed: {reason}"))
        else:
            async with client.pipeline(transaction=False) as pipe:
                await retire(pipe, entry_id).execute()

    async def give_back(self, jobs: list[tuple[bytes, EncodeJob]]) -> None:
        """Jobs taken but not started go back to the stream for the other workers: a copy at its end, this delivery
        retired (left pending, they would wait to be reclaimed)."""
        async with (await self.jobs.client()).pipeline(transaction=True) as pipe:
            for entry_id, job in jobs:
                pipe.xadd(encode_jobs.STREAM, job.to_fields())
                retire(pipe, entry_id)
            await pipe.execute()
        log.info("gave back %d jobs taken but not started", len(jobs))
