"""The migration's counters, for ``migrate status``: every gateway process counts in
memory (database reads, imports, writes, requests by session source) and adds its
counts to one Redis hash per minute every few seconds, so the report sums every process
of every host. The hashes live two hours; a running total lives as long as the data.
Prometheus counters (the plugin module's) are the live per-process view; these are the
history a report needs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from gateway.errors import REDIS_FAILURES
from gateway.redis import Keys, RedisClient

log = logging.getLogger("plugins.legacy_sessions")

MINUTE_TTL = 7200
# The share of requests served by each session source: counted under "source:<name>".
SOURCES = ("gateway", "legacy", "pass-through", "none")


def minute_key(keys: Keys, minute: int) -> str:
    return keys.named(f"legacy:stats:{minute}")


def total_key(keys: Keys) -> str:
    return keys.named("legacy:stats:total")


class MigrationStats:
    def __init__(self, redis: RedisClient, keys: Keys, timeout: float) -> None:
        self.redis = redis
        self.keys = keys
        self.timeout = timeout
        # (minute, name) → count not yet in Redis.
        self._pending: Counter[tuple[int, str]] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        self._pending[(int(time.time() // 60), name)] += n

    async def flush(self) -> bool:
        """Add what was counted to Redis; kept for the next flush when Redis fails (a
        few dozen integers at most: no bound needed beyond the minutes it spans)."""
        if not self._pending:
            return True
        taken, self._pending = self._pending, Counter()
        pipe = self.redis.pipeline(transaction=False)
        for (minute, name), n in taken.items():
            key = minute_key(self.keys, minute)
            pipe.hincrby(key, name, n)
            pipe.expire(key, MINUTE_TTL)
            pipe.hincrby(total_key(self.keys), name, n)
        try:
            async with asyncio.timeout(self.timeout):
                await pipe.execute()
        except REDIS_FAILURES as e:
            log.warning("legacy_sessions: counters not written, redis failed: %s", e)
            for k, n in taken.items():
                if k[0] * 60 > time.time() - MINUTE_TTL:
                    self._pending[k] += n
            return False
        return True

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.flush()


async def last_hour(
    redis: RedisClient, keys: Keys, now: float, redis_timeout: float
) -> tuple[list[dict[str, int]], dict[str, int]]:
    """The last 60 minutes' counters (oldest first; the current minute last) and the
    running totals."""
    current = int(now // 60)
    minutes = range(current - 59, current + 1)
    pipe = redis.pipeline(transaction=False)
    for m in minutes:
        pipe.hgetall(minute_key(keys, m))
    pipe.hgetall(total_key(keys))
    async with asyncio.timeout(redis_timeout):
        got = await pipe.execute()

    def ints(h: dict[str, str] | None) -> dict[str, int]:
        return {k: int(v) for k, v in (h or {}).items()}

    return [ints(h) for h in got[:-1]], ints(got[-1])
