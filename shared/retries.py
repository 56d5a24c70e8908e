"""Retry policies (tenacity) of the client adapters. Only idempotent calls are retried: a call that may have
taken effect before its connection broke (SET NX of a lock, XADD of a job, PUBLISH) is never sent twice.
"""

from __future__ import annotations

import logging

from redis.exceptions import ConnectionError as RedisConnectionError
from tenacity import (AsyncRetrying, before_sleep_log, retry, retry_if_exception_type, stop_after_attempt,
                      stop_never, wait_exponential)

log = logging.getLogger(__name__)

# A Redis read whose connection broke (a restarted Redis, a connection cut by a proxy) is sent once more on a new
# connection; a timeout is not retried: a stalled Redis must make the call fail fast, not twice as slowly.
idempotent_redis = retry(retry=retry_if_exception_type(RedisConnectionError), stop=stop_after_attempt(2),
                         wait=wait_exponential(multiplier=0.01, max=0.1), reraise=True)


def forever(errors: tuple[type[BaseException], ...], first_wait_s: float, max_wait_s: float):
    """For a loop that must outlive its dependency (a subscription, a health watch): it starts again after each
    of `errors`, waiting twice as long each time from `first_wait_s` up to `max_wait_s`."""
    return retry(retry=retry_if_exception_type(errors), stop=stop_never,
                 wait=wait_exponential(multiplier=first_wait_s, max=max_wait_s),
                 before_sleep=before_sleep_log(log, logging.DEBUG))


def attempts(count: int, errors: tuple[type[BaseException], ...]) -> AsyncRetrying:
    """Up to `count` attempts, at once one after the other, each after one of `errors` (the last one is raised):
    for a call tried on the next server when one fails before it did anything."""
    return AsyncRetrying(retry=retry_if_exception_type(errors), stop=stop_after_attempt(max(1, count)),
                         reraise=True)
