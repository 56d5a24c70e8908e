"""The Redis client of every role: every wait on Redis is bounded, so a Redis that is down or stalls makes a call
fail fast (UNAVAILABLE) instead of holding it until the caller's deadline.

redis-py's own default retries a failed command ten times, each attempt waiting up to its socket timeout: a
stalled Redis would hold a call for about a minute. Here a command is tried again once, only when its connection
broke (a restarted Redis, a connection cut by a proxy: the second attempt opens a new one), never after a timeout.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError


def connect(url: str, timeout_s: float, blocking_s: float = 0.0) -> aioredis.Redis:
    """A client whose commands (and connection attempts) give up after `timeout_s`; `blocking_s` is added to the
    read timeout for a role that blocks on purpose (XREADGROUP BLOCK)."""
    return aioredis.from_url(
        url, socket_timeout=timeout_s + blocking_s, socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries=1, supported_errors=(RedisConnectionError,)))
