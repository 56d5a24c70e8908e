"""The Redis clients of every role: one Redis server or one Redis Cluster per URL, every wait bounded, so a Redis
that is down or stalls makes a call fail fast (UNAVAILABLE) instead of holding it until the caller's deadline.

A URL names a plain Redis or any node of a Redis Cluster; which of the two it is, is asked of the server (INFO's
`cluster_enabled`) on first use, not at start: a role starts while its Redis is away (`Endpoint`). A cluster is
reached through redis-py's cluster client: keys go to the node of their slot, pipelines of keys in many slots are
split by node, and its startup nodes become the nodes it discovers, so any one of them may go.

redis-py's own retries are off, for both kinds (by default it retries every command, writes included, each attempt
waiting up to its socket timeout: a stalled Redis would hold a call for about a minute, and a write sent twice may
take effect twice). Retries are the client adapters' own, through tenacity and for idempotent reads only
(shared/retries.py). A cluster client still follows MOVED and ASK replies (the command was not run where it went)
and refreshes its map of the slots after a connection error; `Endpoint.check`, called every second by the role's
health watch, refreshes it too when the cluster's epoch moves (a failover), so that pipelines, which do not refresh
it themselves, reach a promoted replica within a second.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import redis
import redis.asyncio as aioredis
import redis.cluster
import redis.exceptions
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.retry import Retry as SyncRetry

log = logging.getLogger(__name__)

AnyClient = aioredis.Redis | RedisCluster

# What a Redis call may raise: the cluster client raises RedisClusterException, which is not a RedisError, when it
# reaches no node or the slots it knows do not cover the key space.
REDIS_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)

# Errors that mean "Redis is not there right now" (try again later), as opposed to a command Redis refused: a
# connection lost or timed out, a cluster that is down or moving a slot, a key whose slot no node serves yet.
_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ClusterDownError,
                redis.exceptions.TryAgainError, redis.exceptions.SlotNotCoveredError)


def is_unavailable(error: BaseException) -> bool:
    """Whether `error` says Redis (or the part of a cluster that serves the key) is away for now."""
    # A bare RedisClusterException is the cluster client reaching no node (its subclasses are misuse: cross-slot).
    return isinstance(error, _UNAVAILABLE) or type(error) is redis.exceptions.RedisClusterException


def connect(url: str, timeout_s: float, blocking_s: float = 0.0) -> aioredis.Redis:
    """A plain Redis client whose commands (and connection attempts) give up after `timeout_s`; `blocking_s` is
    added to the read timeout for a role that blocks on purpose (XREADGROUP BLOCK)."""
    return aioredis.from_url(url, socket_timeout=timeout_s + blocking_s, socket_connect_timeout=timeout_s,
                             retry=Retry(NoBackoff(), 0))


class ClusterClient(RedisCluster):
    """redis-py's cluster client, where a connection it closed under a call fails that call as a lost connection.

    It resets every connection of the client when a node answers CLUSTERDOWN (a failover under way), also those
    other calls are using at the time; such a call may then fail with an AttributeError from inside the connection
    (its socket gone mid-handshake). That is a lost connection for the caller: a ConnectionError, so that it is
    UNAVAILABLE (or retried, if idempotent) like any other."""

    async def execute_command(self, *args, **kwargs):
        try:
            return await super().execute_command(*args, **kwargs)
        except AttributeError as error:
            raise redis.exceptions.ConnectionError(f"connection closed during the call ({error})") from error

    def pipeline(self, transaction=None, shard_hint=None) -> ClusterPipeline:
        if shard_hint:
            raise redis.exceptions.RedisClusterException("shard_hint is deprecated in cluster mode")
        return _ClusterPipeline(self, transaction)


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True):
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except AttributeError as error:
            raise redis.exceptions.ConnectionError(f"connection closed during the call ({error})") from error


def connect_cluster(url: str, timeout_s: float, blocking_s: float = 0.0) -> ClusterClient:
    """A Redis Cluster client from the URL of any of its nodes, with the same bounds as `connect`."""
    return ClusterClient.from_url(url, socket_timeout=timeout_s + blocking_s, socket_connect_timeout=timeout_s,
                                  retry=Retry(NoBackoff(), 0))


async def is_cluster_url(url: str, timeout_s: float) -> bool:
    """Whether the Redis at `url` is a node of a Redis Cluster (INFO's cluster_enabled:1). Raises a RedisError when
    it does not answer."""
    probe = connect(url, timeout_s)
    try:
        info = await probe.info("cluster")
    finally:
        await probe.aclose()
    return bool(int(info.get("cluster_enabled", 0)))


def is_cluster_client(client: object) -> bool:
    return isinstance(client, (RedisCluster, redis.cluster.RedisCluster))


class Endpoint:
    """One Redis server or Redis Cluster, named by a URL (of any of its nodes), behind the client that suits it.

    Which kind it is, is found once, on first use (`client()`), so a role starts while its Redis is away; until it
    answers, `client()` raises the connection's RedisError, as a command would. A cluster client that reaches none
    of the nodes it knew (they all moved) is dropped and made again from the URL by the next `check`."""

    def __init__(self, url: str, timeout_s: float, blocking_s: float = 0.0, *,
                 client: AnyClient | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.blocking_s = blocking_s
        self._client = client
        self._lock = asyncio.Lock()
        self._epoch: int | None = None   # the cluster's current epoch when last checked

    @classmethod
    def of(cls, client: AnyClient | None) -> Endpoint:
        """An endpoint around a client made elsewhere (its kind is its class)."""
        return cls("", 0.0, client=client)

    @property
    def is_cluster(self) -> bool | None:
        """None until the server was asked."""
        return None if self._client is None else is_cluster_client(self._client)

    async def client(self) -> AnyClient:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                if await is_cluster_url(self.url, self.timeout_s):
                    self._client = connect_cluster(self.url, self.timeout_s, self.blocking_s)
                    log.info("%s is a node of a Redis Cluster", _safe_url(self.url))
                else:
                    self._client = connect(self.url, self.timeout_s, self.blocking_s)
        return self._client

    async def check(self) -> bool:
        """Whether it serves: a plain Redis answers PING; a cluster's state is ok (every slot served). On a cluster,
        a moved epoch (a failover, a node added) refreshes the client's map of the slots."""
        client = await self.client()
        if not isinstance(client, RedisCluster):
            return bool(await client.ping())
        try:
            info = await client.cluster_info()
        except redis.exceptions.RedisClusterException:
            if self.url:   # none of the nodes it knew answers: start again from the URL's
                self._client = None
                await client.aclose()
            raise
        epoch = int(info.get("cluster_current_epoch", 0))
        if self._epoch is not None and epoch != self._epoch:
            log.info("the cluster's epoch moved (%d to %d): refreshing its map of the slots", self._epoch, epoch)
            await client.nodes_manager.initialize()
        self._epoch = epoch
        return info.get("cluster_state") == "ok"

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def endpoint(redis_or_endpoint: Endpoint | AnyClient | None) -> Endpoint:
    """An Endpoint as given, or one around a client (tests and tools hand over clients)."""
    return redis_or_endpoint if isinstance(redis_or_endpoint, Endpoint) else Endpoint.of(redis_or_endpoint)


def _safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    head, at, tail = url.rpartition("@")
    return f"{head.split('//')[0]}//***@{tail}" if at else url


# -- what differs between a plain Redis and a cluster ------------------------------------------------------------

async def read_values(client: AnyClient, keys: list[str]) -> list[bytes | None]:
    """The values of `keys`, in order (None: missing). A cluster's keys are in many slots: one MGET per node."""
    if isinstance(client, RedisCluster):
        return await client.mget_nonatomic(keys)
    return await client.mget(keys)


def publish(pipe, channel: str, message: str, is_cluster: bool):
    """Queues a message to `channel`'s subscribers on `pipe` (or sends it on a client). On a cluster it is sharded
    (SPUBLISH): it goes to the node that serves the channel's slot and its replicas, not to every node of the
    cluster as PUBLISH does, and it may share a transaction with keys of that slot."""
    return pipe.spublish(channel, message) if is_cluster else pipe.publish(channel, message)


async def messages(client: AnyClient, channel: str, poll_s: float = 1.0) -> AsyncIterator[bytes]:
    """The messages published to `channel` (see `publish`), as they come, until the connection fails (raised)."""
    if isinstance(client, RedisCluster):
        pubsub = client.pubsub()
        try:
            await pubsub.ssubscribe(channel)
            while True:
                try:
                    message = await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=poll_s)
                except AttributeError as error:   # see ClusterClient
                    raise redis.exceptions.ConnectionError(f"subscription lost ({error})") from error
                if message is not None and message["type"] == "smessage":
                    yield message["data"]
        finally:
            await pubsub.aclose()
    else:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            async for message in pubsub.listen():
                yield message["data"]
        finally:
            await pubsub.aclose()


def connect_sync(url: str, timeout_s: float) -> redis.Redis | redis.cluster.RedisCluster:
    """A blocking client of the right kind for `url` (for metrics collectors, which run in a thread of their own).
    Raises a RedisError when the server does not answer."""
    kwargs = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    probe = redis.Redis.from_url(url, retry=SyncRetry(NoBackoff(), 0), **kwargs)
    try:
        is_cluster = bool(int(probe.info("cluster").get("cluster_enabled", 0)))
    finally:
        probe.close()
    if is_cluster:
        return redis.cluster.RedisCluster.from_url(url, retry=SyncRetry(NoBackoff(), 0), **kwargs)
    return redis.Redis.from_url(url, retry=SyncRetry(NoBackoff(), 0), **kwargs)
