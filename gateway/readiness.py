"""Can this gateway serve? The probes behind ``/readyz`` (admin.py) and ``python -m
gateway health`` (health.py).

Ready means: Redis answers a write within ``redis.timeout`` (a replica, a full Redis
under ``noeviction`` or an unreachable one does not), and at least one upstream server
takes a TCP connection. One server of any upstream is enough: a load balancer that takes
every gateway out because one rarely used backend is down would turn that outage into a
total one; which upstream failed is in the answer.

``/healthz`` stays "the process answers" (a liveness check must not restart gateways
because Redis is down).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from yarl import URL

from .errors import REDIS_FAILURES
from .redis import Keys, RedisClient

if TYPE_CHECKING:
    from .runtime import Runtime

# Seconds a readiness probe waits for an upstream server's TCP handshake at most (less
# when the upstream's connect_timeout is shorter): a load balancer's probe has a
# timeout of its own, typically a few seconds.
CONNECT_LIMIT = 2.0
PROBE_TTL_MS = 60_000


@dataclass(frozen=True, slots=True)
class Probe:
    ok: bool
    ms: float
    error: str = ""

    def doc(self) -> dict[str, Any]:
        d: dict[str, Any] = {"ok": self.ok, "ms": round(self.ms, 2)}
        if self.error:
            d["error"] = self.error
        return d


def _failure(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def probe_key(keys: Keys) -> str:
    return keys.probe(f"{socket.gethostname()}:{os.getpid()}")


async def redis_write(client: RedisClient, keys: Keys, limit: float) -> Probe:
    """One SET with a short TTL, within ``limit`` seconds."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(limit):
            await client.set(probe_key(keys), f"{time.time():.3f}", px=PROBE_TTL_MS)
    except REDIS_FAILURES as e:
        return Probe(False, (time.perf_counter() - started) * 1000, _failure(e))
    return Probe(True, (time.perf_counter() - started) * 1000)


async def probe_server(server: str, limit: float) -> Probe:
    """A TCP handshake with ``server`` (http(s)://host:port) within ``limit`` seconds,
    closed at once. For
    https, only the TCP part: enough to tell a server that is there from one that is
    not."""
    url = URL(server)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(limit):
            _, writer = await asyncio.open_connection(url.raw_host, url.port)
    except (OSError, TimeoutError) as e:
        return Probe(False, (time.perf_counter() - started) * 1000, _failure(e))
    ms = (time.perf_counter() - started) * 1000
    writer.close()
    return Probe(True, ms)


async def probe_upstreams(
    upstreams: Mapping[str, Sequence[str]], timeouts: Mapping[str, float]
) -> dict[str, dict[str, Probe]]:
    """Every server of every upstream, probed at once; each within its upstream's
    ``timeouts`` (and ``CONNECT_LIMIT``)."""
    jobs = [
        (name, server, probe_server(server, min(timeouts.get(name, CONNECT_LIMIT), CONNECT_LIMIT)))
        for name, servers in upstreams.items()
        for server in servers
    ]
    results = await asyncio.gather(*(job for _, _, job in jobs))
    out: dict[str, dict[str, Probe]] = {name: {} for name in upstreams}
    for (name, server, _), probe in zip(jobs, results, strict=True):
        out[name][server] = probe
    return out


class Readiness:
    """``/readyz``: the probes above on the running gateway. Concurrent checks share
    one run (a load balancer per gateway, several of them, probe at will)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self._running: asyncio.Task[tuple[bool, dict[str, Any]]] | None = None

    async def check(self) -> tuple[bool, dict[str, Any]]:
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._check())
        return await asyncio.shield(self._running)

    async def _check(self) -> tuple[bool, dict[str, Any]]:
        rt = self.rt
        table = rt.table
        servers = {n: [str(s) for s in u.servers] for n, u in table.upstreams.items()}
        timeouts = {n: u.settings.connect_timeout for n, u in table.upstreams.items()}
        redis, ups = await asyncio.gather(
            redis_write(rt.redis.client, rt.redis.keys, rt.redis.timeout),
            probe_upstreams(servers, timeouts),
        )
        upstream_doc: dict[str, Any] = {}
        any_up = False
        for name, probes in ups.items():
            upstream = table.upstreams[name]
            servers_doc = {}
            for s, p in probes.items():
                servers_doc[s] = {**p.doc(), "ejected": upstream.ejected(URL(s))}
                any_up = any_up or p.ok
            upstream_doc[name] = servers_doc
        failed = [name for name, ok in (("redis", redis.ok), ("upstreams", any_up)) if not ok]
        doc: dict[str, Any] = {
            "status": "ready" if not failed else "not ready",
            "checks": {
                "redis": {**redis.doc(), "check": "a write within redis.timeout"},
                "upstreams": {
                    "ok": any_up,
                    "check": "at least one upstream server takes a connection",
                    "servers": upstream_doc,
                },
            },
        }
        if failed:
            doc["failed"] = failed
        return not failed, doc
