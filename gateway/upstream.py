"""Upstream server choice: round robin with passive ejection.

A server that refuses a connection is skipped for ``eject_seconds``; if every server is
ejected the least recently ejected one is tried anyway, because refusing all traffic on
stale information is worse than one more failed connect.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator

from yarl import URL

from . import metrics
from .config import UpstreamSettings
from .upstream_client import Pool

log = logging.getLogger("gateway.upstream")


class Upstream:
    def __init__(self, name: str, settings: UpstreamSettings) -> None:
        self.name = name
        self.settings = settings
        self.servers = [URL(s) for s in settings.servers]
        self.pools = {
            s: Pool(s, settings.max_connections, settings.connect_timeout, settings.read_timeout)
            for s in self.servers
        }
        self._rr = itertools.cycle(range(len(self.servers)))
        self._ejected_until = [0.0] * len(self.servers)

    def candidates(self) -> Iterator[URL]:
        """Every server once, starting at the next in turn, healthy ones first."""
        n = len(self.servers)
        if n == 1:  # the common case, on every request: skip the ordering work
            yield self.servers[0]
            return
        start = next(self._rr)
        order = [(start + i) % n for i in range(n)]
        now = time.monotonic()
        healthy = [i for i in order if self._ejected_until[i] <= now]
        ejected = sorted(
            (i for i in order if self._ejected_until[i] > now),
            key=lambda i: self._ejected_until[i],
        )
        for i in healthy + ejected:
            yield self.servers[i]

    def eject(self, server: URL) -> None:
        if self.settings.eject_seconds <= 0:
            return
        i = self.servers.index(server)
        self._ejected_until[i] = time.monotonic() + self.settings.eject_seconds
        metrics.UPSTREAM_EJECTIONS.labels(str(server)).inc()
        log.warning(
            "upstream %s: %s refused a connection; ejected for %.0fs",
            self.name,
            server,
            self.settings.eject_seconds,
        )

    def restore(self, server: URL) -> None:
        i = self.servers.index(server)
        if self._ejected_until[i]:
            self._ejected_until[i] = 0.0

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


def upstream_url(server: URL, target: str) -> URL:
    """The server plus the request target (``RequestContext.target``), concatenated
    (never ``server.join(...)``, which a path starting with ``//`` would turn into
    another host)."""
    return URL(f"{server}{target}", encoded=True)
