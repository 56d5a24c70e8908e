"""Looking at cached embeddings without reading them: one pipelined round trip for all of a request's images, the
header of each value and its length, checked as a reader would (shared/embedding_cache.py). The gateway and the
vision workers both look this way. On a Redis Cluster the images' keys are in many slots: the pipeline is split by
node (redis-py's cluster pipeline), one round trip to each node at once."""

from __future__ import annotations

import logging

from shared.embedding_cache import HEADER_BYTES, CorruptEntry, EntryHeader, cache_key, check_length, parse_header
from shared.redis_client import AnyClient, Endpoint, endpoint
from shared.retries import idempotent_redis

log = logging.getLogger(__name__)


def queue_probe(pipe, fingerprint: str, sha: str, ttl_s: int = 0) -> None:
    """Queues the reads of one image's value on `pipe` (and, with `ttl_s`, renews its expiry: a no-op on a missing
    key); `read_probe` reads the replies."""
    key = cache_key(fingerprint, sha)
    pipe.getrange(key, 0, HEADER_BYTES - 1).strlen(key)
    if ttl_s:
        pipe.expire(key, ttl_s)


def probe_replies(ttl_s: int = 0) -> int:
    """How many replies queue_probe queued."""
    return 3 if ttl_s else 2


def read_probe(fingerprint: str, sha: str, replies: list, num_columns: int | None = None) -> EntryHeader | None:
    """The header of a valid cached embedding from queue_probe's replies, or None if missing or invalid."""
    prefix, length = replies[0], replies[1]
    if not prefix:
        return None
    try:
        header = parse_header(prefix, fingerprint=fingerprint, sha256=sha, num_columns=num_columns)
        check_length(header, length)
    except CorruptEntry as error:
        log.warning("cached embedding of %s is invalid (%s): treated as a miss", sha, error)
        return None
    return header


@idempotent_redis
async def probe_entries(cache: Endpoint | AnyClient, fingerprint: str, shas: list[str], *,
                        num_columns: int | None = None, ttl_s: int = 0) -> dict[str, EntryHeader | None]:
    """Each distinct image's header (None: missing or invalid), in one round trip (per node of a cluster)."""
    distinct = list(dict.fromkeys(shas))
    if not distinct:
        return {}
    client = await endpoint(cache).client()
    async with client.pipeline(transaction=False) as pipe:
        for sha in distinct:
            queue_probe(pipe, fingerprint, sha, ttl_s)
        replies = await pipe.execute()
    step = probe_replies(ttl_s)
    return {sha: read_probe(fingerprint, sha, replies[step * i:step * i + step], num_columns)
            for i, sha in enumerate(distinct)}
