"""Upstream servers: choice (round robin with passive ejection) and sending a request to
the first that takes it, with the failure a client gets when none does.

A server that refuses a connection is skipped for ``eject_seconds``; if every server is
ejected the least recently ejected one is tried anyway, because refusing all traffic on
stale information is worse than one more failed connect.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterable, Callable, Iterator, Sequence

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

from . import metrics
from .config import UpstreamSettings
from .upstream_client import IDEMPOTENT, ConnectFailed, Pool, StreamsFull, UpstreamResponse

log = logging.getLogger("gateway.upstream")
_ONLY = (0,)


class UpstreamFailure(Exception):
    """No answer from the upstream: ``status`` and ``message`` go to the client."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = {"Retry-After": str(retry_after)} if retry_after else None


class Upstream:
    def __init__(self, name: str, settings: UpstreamSettings) -> None:
        self.name = name
        self.settings = settings
        self.servers = [URL(s) for s in settings.servers]
        self.pools = {
            s: Pool(s, settings.max_connections, settings.connect_timeout, settings.read_timeout)
            for s in self.servers
        }
        # By index on the request path: hashing or comparing yarl URLs per request (the
        # pools dict, servers.index) showed up in the profile.
        self._pool_list = [self.pools[s] for s in self.servers]
        self._rr = itertools.cycle(range(len(self.servers)))
        self._ejected_until = [0.0] * len(self.servers)
        self._seconds = metrics.UPSTREAM_SECONDS.labels(name)

    def _order(self) -> Sequence[int]:
        """Every server's index once, starting at the next in turn, healthy ones first."""
        n = len(self.servers)
        if n == 1:  # the common case, on every request: skip the ordering work
            return _ONLY
        start = next(self._rr)
        order = [(start + i) % n for i in range(n)]
        now = time.monotonic()
        healthy = [i for i in order if self._ejected_until[i] <= now]
        ejected = sorted(
            (i for i in order if self._ejected_until[i] > now),
            key=lambda i: self._ejected_until[i],
        )
        return healthy + ejected

    def candidates(self) -> Iterator[URL]:
        """Every server once, starting at the next in turn, healthy ones first."""
        for i in self._order():
            yield self.servers[i]

    def eject(self, server: URL) -> None:
        self._eject(self.servers.index(server))

    def _eject(self, i: int) -> None:
        if self.settings.eject_seconds <= 0:
            return
        server = self.servers[i]
        self._ejected_until[i] = time.monotonic() + self.settings.eject_seconds
        metrics.UPSTREAM_EJECTIONS.labels(str(server)).inc()
        log.warning(
            "upstream %s: %s refused a connection; ejected for %.0fs",
            self.name,
            server,
            self.settings.eject_seconds,
        )

    def ejected(self, server: URL) -> bool:
        """Whether ``server`` is skipped for now (it refused a connection lately)."""
        return self._ejected_until[self.servers.index(server)] > time.monotonic()

    async def send(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
        *,
        body_started: Callable[[], bool] | None = None,
    ) -> UpstreamResponse:
        """The request to the first server that takes it; UpstreamFailure (the status
        and text for the client) when none does. ``body``: whole in memory, or a stream
        (``body_started`` says whether it has been read from)."""
        streamed = body is not None and not isinstance(body, bytes)
        last_error = ""
        for i in self._order():
            started = time.perf_counter()
            try:
                resp = await self._pool_list[i].request(method, target, headers, body)
            except ConnectFailed as e:
                # The connection was refused, so the request never left: the next
                # server may take it, whatever the method, as long as no byte of a
                # streamed body has been consumed (a small body is whole in memory).
                self._eject(i)
                metrics.UPSTREAM_ERRORS.labels("connect").inc()
                last_error = str(e)
                if not streamed or body_started is None or not body_started():
                    continue
                raise UpstreamFailure(502, "bad gateway: upstream refused the connection") from None
            except StreamsFull:
                metrics.UPSTREAM_ERRORS.labels("busy").inc()
                raise UpstreamFailure(
                    503, "service unavailable: too many uploads in progress", retry_after=5
                ) from None
            except TimeoutError:
                # A connect or a wait for a free pooled connection (PoolTimeout), or no
                # answer within read_timeout (aiohttp's SocketTimeoutError).
                metrics.UPSTREAM_ERRORS.labels("timeout").inc()
                raise UpstreamFailure(
                    504, "gateway timeout: upstream did not answer in time"
                ) from None
            except (aiohttp.ServerDisconnectedError, OSError) as e:
                # Sent, but the server dropped the connection without an answer. Only an
                # idempotent request whose body (if any) is in memory may be tried again
                # elsewhere.
                metrics.UPSTREAM_ERRORS.labels("disconnect").inc()
                last_error = str(e)
                if method in IDEMPOTENT and not streamed:
                    log.warning(
                        "upstream %s %s dropped the connection; retrying",
                        self.name,
                        self.servers[i],
                    )
                    continue
                raise UpstreamFailure(502, "bad gateway: upstream closed the connection") from None
            except (aiohttp.ClientError, HttpProcessingError) as e:
                metrics.UPSTREAM_ERRORS.labels("protocol").inc()
                log.warning(
                    "upstream %s %s: %s: %s", self.name, self.servers[i], type(e).__name__, e
                )
                raise UpstreamFailure(502, "bad gateway: invalid upstream response") from None
            self._seconds.observe(time.perf_counter() - started)
            if self._ejected_until[i]:
                self._ejected_until[i] = 0.0
            return resp
        log.warning("upstream %s: no server answered (%s)", self.name, last_error)
        raise UpstreamFailure(502, "bad gateway: no upstream server answered")

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


def upstream_url(server: URL, target: str) -> URL:
    """The server plus the request target (``RequestContext.target``), concatenated
    (never ``server.join(...)``, which a path starting with ``//`` would turn into
    another host)."""
    return URL(f"{server}{target}", encoded=True)
