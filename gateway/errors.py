"""What counts as "Redis could not answer", in one place for the core and the plugins."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from redis.exceptions import RedisError

from . import metrics

log = logging.getLogger("gateway.proxy")
T = TypeVar("T")

# A connection refused or reset surfaces as OSError, a slow server as TimeoutError
# (from asyncio.timeout or the socket); everything else redis-py raises is a RedisError.
REDIS_FAILURES = (RedisError, OSError, TimeoutError)


_SECONDS: dict[str, Any] = {}


class RedisUnavailable(Exception):
    """Redis did not answer within its timeout."""


async def bounded(op: str, aw: Awaitable[T], limit: float | None) -> T:
    """Await a Redis operation within ``limit`` seconds (None: the operation enforces
    one itself), turning every failure into RedisUnavailable, logged and counted by
    ``op``; its time goes into gateway_redis_seconds{op}."""
    started = time.perf_counter()
    try:
        if limit is None:
            return await aw
        async with asyncio.timeout(limit):
            return await aw
    except REDIS_FAILURES as e:
        metrics.REDIS_ERRORS.labels(op).inc()
        log.warning("redis %s failed: %s: %s", op, type(e).__name__, e)
        raise RedisUnavailable(op) from e
    finally:
        seconds = _SECONDS.get(op)
        if seconds is None:
            # labels() hashes and locks on every call; the operations are few and fixed.
            seconds = _SECONDS[op] = metrics.REDIS_SECONDS.labels(op)
        seconds.observe(time.perf_counter() - started)
