"""Keeps a role's health status in step with its dependencies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

log = logging.getLogger(__name__)


async def watch_redis(client: aioredis.Redis, set_serving: Callable[[bool], Awaitable[None]],
                      interval_s: float = 1.0) -> None:
    """SERVING while Redis answers a PING, NOT_SERVING while it does not; runs until cancelled."""
    current = None
    while True:
        try:
            is_up = bool(await asyncio.wait_for(client.ping(), timeout=interval_s))
        except Exception:  # noqa: BLE001 - any failure means not serving
            is_up = False
        if is_up != current:
            log.info("redis %s: health %s", "reachable" if is_up else "unreachable",
                     "SERVING" if is_up else "NOT_SERVING")
            await set_serving(is_up)
            current = is_up
        await asyncio.sleep(interval_s)
