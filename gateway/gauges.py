"""This process's gauges, sampled in the background every few seconds: the Redis client
pool and the upstream pools in use, the upstream servers' health (passive ejection), the
CPU time used. In memory only (no Redis, no I/O), so every worker runs it; never on the
request path.

Sampled rather than counted as requests take and return connections: a gauge set on
every request would cost each request a write (in multiprocess mode, to a file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING

from . import metrics

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("gateway.metrics")

INTERVAL = 5.0  # seconds between samples


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ProcessGauges:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self._task: asyncio.Task[None] | None = None
        self._cpu = _cpu_seconds()

    def start(self) -> None:
        metrics.WORKERS.set(1)
        metrics.CPUS.set(_cpus())
        self.sample()
        self._task = asyncio.create_task(self._run(), name="process-gauges")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        metrics.WORKERS.set(0)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            try:
                self.sample()
            except Exception:  # a gauge must never stop the sampling, nor the process
                log.exception("sampling the process gauges failed")

    def sample(self) -> None:
        cpu = _cpu_seconds()
        metrics.CPU_SECONDS.inc(max(0.0, cpu - self._cpu))
        self._cpu = cpu
        client = self.rt.redis.client
        # A cluster client has a pool per node: sampled for one node only it would
        # mislead, so the pool gauges are left out under redis.cluster.
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            # get_connection_count: redis-py's public count (its OpenTelemetry support
            # uses it): [(idle, {...}), (in use, {...})], told apart by the state.
            for count, attributes in pool.get_connection_count():
                state = attributes.get("db.client.connection.state")
                if state in ("idle", "used"):
                    metrics.REDIS_POOL.labels("idle" if state == "idle" else "in_use").set(
                        count
                    )
            metrics.REDIS_POOL_MAX.set(pool.max_connections)
        for name, upstream in self.rt.table.upstreams.items():
            pools = upstream.pools.values()
            metrics.UPSTREAM_POOL.labels(name, "in_use").set(sum(p.in_use for p in pools))
            metrics.UPSTREAM_POOL.labels(name, "idle").set(sum(p.idle for p in pools))
            metrics.UPSTREAM_POOL_MAX.labels(name).set(sum(p.limit for p in pools))
            for server in upstream.servers:
                up = 0 if upstream.ejected(server) else 1
                metrics.UPSTREAM_UP.labels(name, str(server)).set(up)
