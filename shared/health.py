"""Keeps a role's health status in step with its dependencies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from shared.redis_client import AnyClient, Endpoint, endpoint

log = logging.getLogger(__name__)


class Readiness:
    """SERVING while every named condition holds (Redis reachable, engine healthy), NOT_SERVING otherwise: each
    condition has its own watcher, and one of them must not turn the role SERVING while another one fails."""

    def __init__(self, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        self._set_serving = set_serving
        self._conditions: dict[str, bool] = {}
        self._current: bool | None = None

    async def set(self, name: str, is_met: bool) -> None:
        self._conditions[name] = is_met
        is_serving = all(self._conditions.values())
        if is_serving != self._current:
            self._current = is_serving
            await self._set_serving(is_serving)


async def watch_redis(redis: Endpoint | AnyClient, set_serving: Callable[[bool], Awaitable[None]],
                      interval_s: float = 1.0, name: str = "redis") -> None:
    """SERVING while Redis answers (a plain Redis a PING; a cluster with every slot served: Endpoint.check),
    NOT_SERVING while it does not; runs until cancelled. `name` says which Redis, in the log."""
    redis = endpoint(redis)
    current = None
    while True:
        try:
            async with asyncio.timeout(interval_s):  # not wait_for: it may lose a cancel on Python 3.11
                is_up = await redis.check()
        except Exception:  # noqa: BLE001 - any failure means not serving
            is_up = False
        if is_up != current:
            log.info("%s %s", name, "reachable" if is_up else "unreachable")
            await set_serving(is_up)
            current = is_up
        await asyncio.sleep(interval_s)
