"""What Redis holds, counted in the background: keys by family (``session``, ``cart``,
``user_sessions``, ...: the name before the first ``:`` after ``session.key_prefix``),
Redis's memory against ``maxmemory``, and the keys it has evicted.

Only the process serving the admin listener runs it (worker 0 with workers): one count
per gateway, not one per worker. Never ``KEYS`` and never on the request path: a pass is
a ``SCAN`` of at most ``SCAN_COUNT`` keys per call, each call within ``redis.timeout``,
with a pause after each so that a pass over millions of keys takes Redis a few percent
of its time; the gauges change when a pass completes, then the next one waits for
``admin.population_interval``. The family names a gauge takes are capped
(``MAX_FAMILIES``, the rest count as ``other``), so no key layout can grow the number of
series without end.

With Redis Cluster a pass walks every primary (a SCAN sees one node), and memory and
evictions are the primaries' summed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

from redis.asyncio import RedisCluster

from . import metrics
from .errors import REDIS_FAILURES
from .logs import Throttle
from .redis import Keys, RedisClient
from .redis.keys import glob_escape

log = logging.getLogger("gateway.metrics")

SCAN_COUNT = 1000
PAUSE = 0.002  # seconds after each SCAN call
MAX_FAMILIES = 32


def family(key: str, prefix: str) -> str:
    rest = key[len(prefix) :]
    name, sep, _ = rest.partition(":")
    return name if sep and name else "other"


class PopulationSampler:
    def __init__(self, redis: RedisClient, keys: Keys, interval: float, timeout: float) -> None:
        self.redis = redis
        self.prefix = keys.prefix
        self.interval = interval
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self._seen: set[str] = set()
        self._failures = Throttle(burst=1, period=300.0)
        self._stopping = False
        self.passes = 0  # completed passes (for tests and logs)

    def start(self) -> None:
        if self.interval > 0:
            self._task = asyncio.create_task(self._run(), name="population-sampler")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            # redis-py (8.2) can swallow a cancellation that lands inside a command (the
            # command then returns normally; seen in about 1 of 100 tries): the pass
            # also stops at the flag, and the wait is bounded.
            await asyncio.wait([self._task], timeout=2 * self.timeout + 1)

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except REDIS_FAILURES as e:
                if self._failures.allow():
                    more = self._failures.take_suppressed()
                    log.warning(
                        "counting the keys in Redis failed: %s: %s%s",
                        type(e).__name__,
                        e,
                        f" ({more} more failures not logged)" if more else "",
                    )
            if self._stopping:
                return
            await asyncio.sleep(self.interval)

    async def _call(self, aw: Awaitable[Any]) -> Any:
        async with asyncio.timeout(self.timeout):
            return await aw

    async def sample(self) -> dict[str, int]:
        """One pass: the memory and evictions, then the keys by family; the gauges are
        set and the counts returned."""
        memory = await self._info("memory")
        metrics.REDIS_MEMORY.labels("used").set(float(memory.get("used_memory", 0)))
        metrics.REDIS_MEMORY.labels("max").set(float(memory.get("maxmemory", 0)))
        stats = await self._info("stats")
        metrics.REDIS_EVICTED.set(float(stats.get("evicted_keys", 0)))
        started = time.monotonic()
        counts: dict[str, int] = {}
        match = f"{glob_escape(self.prefix)}*"
        known = set(self._seen)
        # One node, or every primary of a cluster in turn (a SCAN cursor is a node's).
        nodes = self.redis.get_primaries() if isinstance(self.redis, RedisCluster) else [None]
        for node in nodes:
            cursor = 0
            while True:
                cursor, batch = await self._scan(cursor, match, node)
                for key in batch:
                    name = family(key, self.prefix)
                    if name not in known:
                        if len(known) >= MAX_FAMILIES:
                            name = "other"
                        else:
                            known.add(name)
                    counts[name] = counts.get(name, 0) + 1
                if cursor == 0 or self._stopping:
                    break
                await asyncio.sleep(PAUSE)
        # Families that had keys and have none now go to 0 rather than keep their count.
        for name in self._seen - counts.keys():
            metrics.REDIS_KEYS.labels(name).set(0)
        for name, n in counts.items():
            metrics.REDIS_KEYS.labels(name).set(n)
        self._seen |= counts.keys()
        metrics.REDIS_SCAN_SECONDS.set(time.monotonic() - started)
        self.passes += 1
        return counts

    async def _scan(self, cursor: int, match: str, node: Any) -> tuple[int, list[str]]:
        if node is None:
            cur, batch = await self._call(self.redis.scan(cursor, match=match, count=SCAN_COUNT))
            return int(cur), batch
        # A cluster client answers ({node name: cursor}, keys) even for one node.
        cursors, batch = await self._call(
            self.redis.scan(cursor, match=match, count=SCAN_COUNT, target_nodes=node)
        )
        return int(next(iter(cursors.values()))), batch

    async def _info(self, section: str) -> dict[str, Any]:
        """INFO ``section``; for a cluster, its primaries' numbers summed."""
        if not isinstance(self.redis, RedisCluster):
            info: dict[str, Any] = await self._call(self.redis.info(section))
            return info
        per_node = await self._call(
            self.redis.info(section, target_nodes=RedisCluster.PRIMARIES)
        )
        total: dict[str, Any] = {}
        for one in per_node.values():
            for k, v in one.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        return total
