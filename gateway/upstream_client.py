"""A lean HTTP/1.1 client for the proxy path, built from aiohttp's own parts.

Why not ``aiohttp.ClientSession``: under load, the profile put ~40 % of the gateway's
time in ``ClientSession._request`` (URL objects, ClientRequest/ClientResponse, auto
headers, tracing hooks, cookie jars, redirect logic) — machinery a reverse proxy does not
use. Here the parts that matter are still aiohttp's: the protocol and C response parser
(``client_proto.ResponseHandler``: keep-alive, chunked/length framing, read timeouts,
payload flow control), its header serializer (rejects control characters, i.e. header
injection) and ``StreamWriter`` for request bodies. What is ours is only the pooling and
the request head. Measured on the benchmark machine, a minimal proxy built on these
parts used half the CPU per request of the same proxy on ``ClientSession``.

WebSocket upgrades still go through ``ClientSession.ws_connect`` (websocket.py).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterable

from aiohttp.client import IDEMPOTENT_METHODS
from aiohttp.client_exceptions import ClientOSError, ServerDisconnectedError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_writer import StreamWriter
from aiohttp.http_writer import _serialize_headers as _aiohttp_serialize_headers
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# An idle pooled connection older than this is closed rather than reused: backends close
# idle keep-alive connections on their own schedule (often 5-75 s), and reusing one they
# are about to close is the classic "server disconnected" race on the next request (4 s:
# below the 5 s of uvicorn, gunicorn and Node; a request that still loses the race is
# retried on a new connection when that is safe, see Pool.request).
KEEPALIVE_SECONDS = 4.0
# Methods whose semantics anticipate no content: sent without Content-Length when they
# have none (RFC 9110 8.6). aiohttp's GET_METHODS leaves out DELETE and CONNECT.
_BODYLESS_OK = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE", "CONNECT"})
# Methods that may be sent twice (RFC 9110 9.2.2), as aiohttp's client retries them.
IDEMPOTENT = IDEMPOTENT_METHODS


def serialize_head(status_line: str, headers: CIMultiDict[str]) -> bytes:
    """The request head as bytes, by aiohttp's own serializer: private (``_serialize_headers``
    in http_writer), but the one that refuses CR, LF and NUL in names and values (header
    injection) exactly as aiohttp's client does; StreamWriter.write_headers, its public
    caller, needs a writer and a separate write. The one use of it in the gateway;
    tests/test_upstream_client.py fails if a release moves or changes it."""
    return _aiohttp_serialize_headers(status_line, headers)


def _reusable(proto: ResponseHandler) -> bool:
    # should_close also covers bytes or a stored error that arrived while it was idle
    # (a 408 before closing, a confused backend): they must not answer the next request.
    return proto.is_connected() and not proto.should_close


class ConnectFailed(OSError):
    """No connection could be opened: nothing was sent, so any request may go elsewhere."""


class StreamsFull(Exception):
    """As many streamed request bodies in flight to this server as its pool may hold."""


class PoolTimeout(TimeoutError):
    """Neither a pooled connection came free nor a new one connected in time."""


class UpstreamResponse:
    """Status, headers and a streaming body of one upstream answer."""

    __slots__ = (
        "_dedicated",
        "_pool",
        "_proto",
        "content",
        "content_length",
        "headers",
        "reason",
        "server",
        "status",
    )

    def __init__(
        self,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
        pool: Pool,
        proto: ResponseHandler,
        dedicated: bool = False,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        cl = headers.get("Content-Length")
        self.content_length = int(cl) if cl is not None and cl.isdigit() else None
        self._pool: Pool | None = pool
        self._proto = proto
        self._dedicated = dedicated
        # Which server answered (scheme://host:port), for the access log.
        self.server = pool.name

    async def read(self) -> bytes:
        return await self.content.read()

    def release(self) -> None:
        """Give the connection back (kept alive only if the body was read to its end)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if self._dedicated:
            pool.end_stream(self._proto)
        else:
            pool.put(self._proto, reusable=self.content.is_eof())


class Pool:
    """Keep-alive connections to one server, at most ``limit`` open at once."""

    def __init__(
        self, server: URL, limit: int, connect_timeout: float, read_timeout: float
    ) -> None:
        https = server.scheme == "https"
        self.name = str(server)
        self.host = server.raw_host or ""
        self.port = server.port or (443 if https else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if https else None
        # yarl brackets an IPv6 literal and leaves out the scheme's default port.
        self.host_header = server.host_port_subcomponent or self.host
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: collections.deque[tuple[ResponseHandler, float]] = collections.deque()
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        # Connections carrying a streamed request body: outside the pool and its limit
        # (they wait on a client, which a pooled connection must never do), at most
        # ``limit`` of them too.
        self._streams = 0

    @property
    def in_use(self) -> int:
        """Connections open and not idle (in a request), streamed uploads included."""
        return self._open - len(self._idle) + self._streams

    @property
    def idle(self) -> int:
        return len(self._idle)

    def _take_idle(self) -> ResponseHandler | None:
        """The most recently used idle connection still fit for reuse; stale ones close."""
        now = time.monotonic()
        while self._idle:
            proto, since = self._idle.pop()
            if _reusable(proto) and now - since < KEEPALIVE_SECONDS:
                return proto
            self._drop(proto)
        return None

    async def get(self, fresh: bool = False) -> tuple[ResponseHandler, bool]:
        """A connection, and whether it was reused (``fresh``: never a pooled one)."""
        if not fresh and (proto := self._take_idle()) is not None:
            return proto, True
        if fresh and self._idle and self._open >= self.limit:
            self._drop(self._idle.popleft()[0])  # make room: the oldest idle one goes
        if self._open >= self.limit:
            # connect_timeout also bounds this wait: with every connection busy, the
            # client gets a timely 504 instead of queueing without end.
            try:
                async with asyncio.timeout(self.connect_timeout):
                    while self._open >= self.limit:
                        await self._wait_turn()
                        if not fresh and (proto := self._take_idle()) is not None:
                            return proto, True
            except TimeoutError:
                raise PoolTimeout(f"no free connection to {self.host}:{self.port}") from None
        self._open += 1
        try:
            return await self._connect(), False
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    async def _connect(self) -> ResponseHandler:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: ResponseHandler(loop),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            raise PoolTimeout(f"connect to {self.host}:{self.port} timed out") from None
        except OSError as e:
            raise ConnectFailed(e.errno, f"cannot connect to {self.host}:{self.port}: {e}") from e
        return proto

    def put(self, proto: ResponseHandler, reusable: bool) -> None:
        if reusable and not self._closed and _reusable(proto):
            self._idle.append((proto, time.monotonic()))
        else:
            proto.close()
            self._open -= 1
        self._wake()

    def _drop(self, proto: ResponseHandler) -> None:
        proto.close()
        self._open -= 1
        self._wake()

    async def _wait_turn(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self._wake()  # woken and gone at once: pass the turn on
            raise

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def request(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> UpstreamResponse:
        """Send and return once the response head arrived. ``body``: None, the whole
        body, or a stream (sent chunked unless headers carry a Content-Length). Raises
        ConnectFailed or PoolTimeout (nothing was sent), ServerDisconnectedError or
        ClientOSError (sent, no answer), SocketTimeoutError, HttpProcessingError (an
        invalid answer), or whatever the body stream raised."""
        if body is not None and not isinstance(body, bytes):
            return await self._stream(method, target, headers, body)
        proto, reused = await self.get()
        while True:
            try:
                return await _exchange(self, proto, method, target, headers, body, False)
            except (ServerDisconnectedError, ClientOSError):
                self.put(proto, reusable=False)
                if not (reused and method in IDEMPOTENT):
                    raise
            except BaseException:
                self.put(proto, reusable=False)
                raise
            # A pooled connection the server closed as we sent: nothing was answered, so
            # a request that is safe to repeat goes out once more, on a new connection
            # (its body, if any, is whole in memory).
            proto, reused = await self.get(fresh=True)

    async def _stream(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes],
    ) -> UpstreamResponse:
        if self._streams >= self.limit:
            raise StreamsFull(f"too many streamed uploads to {self.host}:{self.port}")
        self._streams += 1
        try:
            proto = await self._connect()
        except BaseException:
            self._streams -= 1
            raise
        try:
            return await _exchange(self, proto, method, target, headers, body, True)
        except BaseException:
            self.end_stream(proto)
            raise

    def end_stream(self, proto: ResponseHandler) -> None:
        proto.close()
        self._streams -= 1

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._drop(self._idle.pop()[0])


async def _exchange(
    pool: Pool,
    proto: ResponseHandler,
    method: str,
    target: str,
    headers: CIMultiDict[str],
    body: bytes | AsyncIterable[bytes] | None,
    dedicated: bool,
) -> UpstreamResponse:
    # A new parser for every exchange, as aiohttp's client makes: one kept from the last
    # answer may hold the start of another message (bytes a confused backend sent
    # beyond its answer), and this answer would be parsed onto it. Keeping it saved ~2 %
    # of a request's CPU; tests/test_upstream_client.py shows the splice it allowed.
    proto.set_response_params(
        skip_payload=method == "HEAD",
        read_until_eof=True,
        auto_decompress=False,
        read_timeout=pool.read_timeout,
    )
    headers["Host"] = pool.host_header
    # The gateway answered the client's Expect itself; the body follows at once.
    headers.popall("Expect", None)
    transport = proto.transport
    if transport is None:
        raise ServerDisconnectedError()
    status_line = f"{method} {target} HTTP/1.1"
    if body is None:
        if method not in _BODYLESS_OK:
            headers["Content-Length"] = "0"
        transport.write(serialize_head(status_line, headers))
    elif isinstance(body, bytes):
        headers["Content-Length"] = str(len(body))
        # One write for head and body: a typical form post is one packet.
        transport.write(serialize_head(status_line, headers) + body)
    else:
        writer = StreamWriter(proto, asyncio.get_running_loop())
        if "Content-Length" not in headers:
            headers["Transfer-Encoding"] = "chunked"
            writer.enable_chunking()
        await writer.write_headers(status_line, headers)
        async for chunk in body:
            await writer.write(chunk)
        await writer.write_eof()
    # Like aiohttp: the read timeout runs from the end of the request, not during upload.
    proto.start_timeout()
    while True:
        message, payload = await proto.read()
        # 1xx interim answers (100 Continue, 103 Early Hints) are not the response.
        if message.code >= 200 or message.code < 100 or message.code == 101:
            break
        proto.start_timeout()  # the parser stopped the read timer at the interim answer
    return UpstreamResponse(
        message.code, message.reason, message.headers, payload, pool, proto, dedicated
    )
