"""The Redis client of every role: every wait on Redis is bounded, so a Redis that is down or stalls makes a call
fail fast (UNAVAILABLE) instead of holding it until the caller's deadline.

redis-py's own retries are off (by default it retries every command, writes included, each attempt waiting up to
its socket timeout: a stalled Redis would hold a call for about a minute). Retries are the client adapters' own,
through tenacity and for idempotent reads only (shared/retries.py).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def connect(url: str, timeout_s: float, blocking_s: float = 0.0) -> aioredis.Redis:
    """A client whose commands (and connection attempts) give up after `timeout_s`; `blocking_s` is added to the
    read timeout for a role that blocks on purpose (XREADGROUP BLOCK)."""
    return aioredis.from_url(url, socket_timeout=timeout_s + blocking_s, socket_connect_timeout=timeout_s,
                             retry=Retry(NoBackoff(), 0))
