"""How the gateway's HTTP server is built: aiohttp's, with bounds on what one client
connection may cost (issue 10).

aiohttp bounds one header line (max_field_size) and the number of headers, not a request
head as a whole; it has no deadline for a head, and it accepts every connection the
process can open. Here:

- ``GuardedHandler`` counts the bytes of each request head and answers 431 past
  ``limits.max_header_bytes``; a head not complete ``limits.header_timeout`` after its
  first byte is answered 408. Idle keep-alive connections (and ones that never send) are
  closed by aiohttp's own timer after ``limits.keepalive_timeout`` (see server_kwargs).
- ``GuardedServer`` hands out that handler, and past ``limits.max_connections`` open
  client connections a ``_Busy`` protocol that writes one canned 503 and closes.
- ``GatewayRunner`` runs an app on it, with the cap kept under the file-descriptor limit.
- When a burst of connections is over, the C heap's free pages go back to the system.

This is the one module that touches aiohttp's private protocol internals: each use says
why, and tests/test_server_internals.py fails if an aiohttp upgrade changes them.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import resource
from typing import Any, cast

from aiohttp import StreamReader, hdrs, web
from aiohttp.http import RawRequestMessage
from aiohttp.web_protocol import RequestPayloadError

from .app import direct_handler
from .config import LimitsSettings, Settings
from .forwarded import TrustedProxies, bucket
from .logs import Throttle
from .metrics import CLIENT_REFUSALS
from .runtime import RUNTIME

_REFUSALS = Throttle()
log = logging.getLogger("gateway.server")

HEAD_END = b"\r\n\r\n"
CRLF = b"\r\n"
# After a refusal the connection is half-closed and what the client still sends is read
# and dropped, for this long and up to this many bytes: closing with unread bytes makes
# the kernel send a reset, which can destroy the answer before the client reads it.
LINGER = 1.0
LINGER_BYTES = 65536
# When open client connections fall to half of a peak of at least this many, the C heap
# is trimmed (see _trim_heap).
TRIM_MIN_PEAK = 256
TRIM_DELAY = 1.0
# Descriptors kept for everything but client connections: listening sockets, Redis
# links, logs, the embedded Redis's pipes, a refused client's lingering socket.
FD_RESERVE_EXTRA = 64


def _canned(status: int, reason: str, body: str, extra: str = "") -> bytes:
    data = (body + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + data


TIMEOUT_408 = _canned(408, "Request Timeout", "request head not received in time")
TOO_LARGE_431 = _canned(431, "Request Header Fields Too Large", "request head too large")
TOO_MANY_429 = _canned(
    429, "Too Many Requests", "too many connections from this address", "Retry-After: 1\r\n"
)
BUSY_503 = _canned(
    503, "Service Unavailable", "too many connections, retry shortly", "Retry-After: 1\r\n"
)


# --- aiohttp internals (3.14), wrapped here and nowhere else ----------------------------
# RequestHandler has no public hook between "bytes arrived" and "a message was parsed",
# nor a public way to ask whether it is idle; these read the state its own
# data_received() and keep-alive timer use.


def _parsed(h: web.RequestHandler) -> int:
    # How many messages (requests or parse errors) the parser produced so far; the
    # difference across a feed says whether that feed completed a head.
    return h._request_count


def _last_message(h: web.RequestHandler) -> tuple[object, StreamReader] | None:
    # The newest queued (message, payload). The request handler task pops from the left
    # and only between reads, so right after a feed that produced messages it is there;
    # None only for messages aiohttp parsed itself and already took (then a head is
    # assumed to follow: a wrong guess could refuse, never let a large head through).
    if not h._messages:
        return None
    msg, payload = h._messages[-1]
    return msg, payload


def _queue_full(h: web.RequestHandler) -> bool:
    # With this many pipelined requests queued aiohttp pauses reading (and its Python
    # parser holds back further heads) until the handler task drains the queue.
    return len(h._messages) >= h._max_msg_queue_size


def _counting(h: web.RequestHandler) -> bool:
    # False once the connection is closing (aiohttp then drops incoming bytes) or was
    # upgraded (WebSocket frames, not requests, follow).
    return not (h._close or h._force_close or h._upgraded or h._payload_parser is not None)


def _idle(h: web.RequestHandler) -> bool:
    # Waiting for the next request with none queued: no response is being written, so
    # one of ours can be. The same test aiohttp's keep-alive timer uses.
    waiter = h._waiter
    return waiter is not None and not waiter.done() and not h._messages


def _handler_kwargs(server: web.Server) -> dict[str, Any]:
    # The options aiohttp's Application gives each RequestHandler (runner options plus
    # the app's debug flag and handler_args), so ours get exactly the same.
    return dict(server._kwargs)


# ----------------------------------------------------------------------------------------


class GuardedHandler(web.RequestHandler):
    """aiohttp's request handler, counting request heads and timing them.

    A head is the request line and headers, from the first byte after the previous
    message ended to its blank line. Incoming bytes are split at head ends and at the
    end of Content-Length bodies and fed to the parser piece by piece, so body bytes are
    never counted and no head can hide behind another in the same read. A chunked
    body's end cannot be found without parsing it; the head that follows it in the same
    read is counted from the last blank line of that read (an undercount of at most one
    read, never an overcount). The trailer section of a chunked body is bounded by
    max_header_bytes too: it is the one part of a body the parser keeps in memory.
    """

    __slots__ = (
        "_body",
        "_body_left",
        "_drained",
        "_framing",
        "_gloop",
        "_head_bytes",
        "_head_last",
        "_head_started",
        "_head_timer",
        "_held",
        "_limits",
        "_linger",
        "_seen",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        limits: LimitsSettings,
        loop: asyncio.AbstractEventLoop,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._limits = limits
        self._gloop = loop
        self._seen = 0  # _parsed() after our last feed; it moves on behind our back too
        self._head_bytes = 0  # bytes of the head being received
        self._head_last = b""  # its last 3 bytes: a blank line may straddle two reads
        self._head_started = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # the request body being received
        self._body_left: int | None = None  # its bytes still to come (None: chunked)
        self._framing = 0  # chunked: bytes since the body last grew (sizes, trailers)
        self._held: bytes | None = None  # bytes after a head the parser holds back
        self._linger: asyncio.TimerHandle | None = None  # refused: closing soon
        self._drained = 0  # bytes dropped since

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            self._drained += len(data)
            if self._drained > LINGER_BYTES:
                self.force_close()
            return
        if not _counting(self):
            super().data_received(data)
            return
        if _parsed(self) != self._seen:
            # aiohttp parsed on its own (the bytes after a declined upgrade).
            self._seen = _parsed(self)
            self._adopt()
        if self._held is not None:
            # aiohttp resumes (data is b"": reading is paused while we hold bytes).
            if self._feed(b""):  # a head the Python parser kept back, if any
                self._adopt()
            if _queue_full(self):
                self._held += data
                return
            data, self._held = self._held + data, None
        if not data:
            if self._feed(b""):  # the parser resumes what it held back
                self._adopt()
            return
        pos = 0
        while pos < len(data):
            if not _counting(self):
                self._feed(data[pos:])  # after an upgrade: aiohttp keeps the rest
                return
            if self._body is not None and self._body_left is None and self._body.is_eof():
                self._body = None  # a chunked body the parser finished on resuming
            if self._body is None:
                pos = self._take_head(data, pos)
            elif self._body_left is None:
                self._take_chunked(data[pos:])
                return
            else:
                n = min(self._body_left, len(data) - pos)
                self._body_left -= n
                self._feed(data[pos : pos + n])
                pos += n
                if self._body_left == 0:
                    self._body = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._end_head()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        super().connection_lost(exc)

    def _feed(self, piece: bytes) -> bool:
        """Give bytes to aiohttp's parser; True if that completed a message."""
        before = _parsed(self)
        super().data_received(piece)
        self._seen = _parsed(self)
        return self._seen != before

    def _take_head(self, data: bytes, pos: int) -> int:
        limit = self._limits.max_header_bytes
        if self._head_bytes == 0:
            # Empty lines before a request line are skipped by the parser (RFC 9112
            # section 2.2) and cost nothing: the head starts after them. (They are still
            # fed to it, in case it holds a head we did not see begin.)
            start = pos
            while data.startswith(CRLF, pos):
                pos += 2
            if pos > start:
                self._feed(data[start:pos])
                if pos == len(data) or not _counting(self):
                    return pos
        room = limit - self._head_bytes
        end = self._head_end(data, pos, room)
        if end < 0:
            n = len(data) - pos
            if n > room:
                self._refuse_too_large()
                return len(data)
            if self._head_bytes == 0:  # its first byte came with this read
                self._head_started = self._gloop.time()
            self._head_bytes += n
            self._head_last = (self._head_last + data[max(pos, len(data) - 3) :])[-3:]
            # Only a head that spans reads needs a deadline (most arrive in one).
            self._start_head_timer()
            self._feed(data[pos:])
            return len(data)
        if end - pos > room:  # the blank line's last bytes took it over the limit
            self._refuse_too_large()
            return len(data)
        self._end_head()
        if self._feed(data[pos:end]) and not self._adopt():
            return len(data)  # a parse error: aiohttp answers 400, drops the rest
        if _queue_full(self) and end < len(data):
            # As many pipelined requests queued as aiohttp allows: it has paused reading
            # until the handler task catches up, and the rest of this read waits here
            # (the Python parser may also keep this head until then).
            self._held = data[end:]
            return len(data)
        return end

    def _head_end(self, data: bytes, pos: int, room: int) -> int:
        """Index just past the blank line ending the head, if within ``room`` bytes."""
        last = self._head_last
        for k in range(len(last), 0, -1):
            if last[-k:] + data[pos : pos + 4 - k] == HEAD_END:
                return pos + 4 - k
        i = data.find(HEAD_END, pos, pos + room)
        return -1 if i < 0 else i + 4

    def _take_chunked(self, rest: bytes) -> None:
        body = self._body
        assert body is not None
        size = body.total_bytes
        new = self._feed(rest)
        transport = self.transport
        if body.total_bytes > size or transport is None or not transport.is_reading():
            # Data arrived, or the body is paused for a slow reader and the parser holds
            # the rest of this read: not a run of bytes without data.
            self._framing = 0
        else:
            self._framing += len(rest)
        if new and not body.is_eof():
            newest = _last_message(self)
            if newest is not None and not isinstance(newest[0], RawRequestMessage):
                # The parser refused the chunked body half-way. aiohttp's C parser then
                # drops the body's stream without ending it, so the handler reading it
                # would wait for its idle timeout: end it with the error at once (the
                # proxy answers 400, and the upstream connection it streams to is freed).
                body.set_exception(RequestPayloadError("malformed chunked body"))
        if new or body.is_eof():
            self._resync(rest, new)
        elif self._framing > self._limits.max_header_bytes:
            # Trailers of the request being handled: its body can never complete.
            self._refuse_too_large(abort=True)

    def _resync(self, rest: bytes, new: bool) -> None:
        """The chunked body ended within ``rest``, which the parser took whole: any head
        begun after it is what follows the read's last blank line (a chunked body ends
        with one, so does every head), less the body of a newer message."""
        body_bytes = 0
        if new:
            self._adopt()
            if self._body is not None:
                return
            newest = _last_message(self)
            body_bytes = newest[1].total_bytes if newest is not None else 0
        else:
            self._body = None
        i = rest.rfind(HEAD_END)
        after = (len(rest) - i - 4 if i >= 0 else len(rest)) - body_bytes
        if after > 0:
            self._head_started = self._gloop.time()
            self._head_bytes = after
            self._head_last = rest[-3:]
            self._start_head_timer()
            if after > self._limits.max_header_bytes:
                self._refuse_too_large()

    def _adopt(self) -> bool:
        """After the parser completed messages: is a body of the newest still coming?
        False if the newest is a parse error."""
        self._end_head()
        self._body = None
        self._framing = 0
        newest = _last_message(self)
        if newest is None:
            return True
        msg, payload = newest
        if not isinstance(msg, RawRequestMessage):
            return False
        if payload.is_eof():
            return True
        self._body = payload
        length = msg.headers.get(hdrs.CONTENT_LENGTH)
        self._body_left = (
            None if msg.chunked or length is None else int(length) - payload.total_bytes
        )
        return True

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self._gloop.call_at(
                self._head_started + self._limits.header_timeout, self._head_timed_out
            )

    def _end_head(self) -> None:
        self._head_bytes = 0
        self._head_last = b""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_bytes:
            self._refuse(
                TIMEOUT_408,
                "header_timeout",
                f"request head not complete within {self._limits.header_timeout:g}s",
            )

    def _refuse_too_large(self, abort: bool = False) -> None:
        what = "chunked trailers" if abort else "request head"
        self._refuse(
            TOO_LARGE_431,
            "header_too_large",
            f"{what} over {self._limits.max_header_bytes} bytes",
            abort,
        )

    def refuse_connection(self, answer: bytes, reason: str, detail: str) -> None:
        """Refuse a connection as it is made (nothing has been read from it yet)."""
        self._count_refusal(reason, detail)
        if self.transport is not None:
            self._answer_and_linger(self.transport, answer)

    def _count_refusal(self, reason: str, detail: str) -> None:
        CLIENT_REFUSALS.labels(reason).inc()
        # A flood of refused connections must not flood the log: a few lines per
        # period, then a count (the metric has every one).
        if _REFUSALS.allow():
            more = _REFUSALS.take_suppressed()
            log.info(
                "client %s: %s; connection closed%s",
                _peer(self.peername),
                detail,
                f" ({more} more refused connections not logged)" if more else "",
            )

    def _refuse(self, answer: bytes, reason: str, detail: str, abort: bool = False) -> None:
        self._count_refusal(reason, detail)
        self._end_head()
        self._body = self._held = None
        self._framing = 0
        transport = self.transport
        if transport is None:
            return
        if abort:
            self.force_close()
            return
        if not _idle(self):
            # An earlier pipelined request is being answered: ours cannot be written.
            # The connection closes when that response is done; queued requests are
            # dropped, and so is what still arrives.
            self.close()
            return
        self._answer_and_linger(transport, answer)

    def _answer_and_linger(self, transport: asyncio.Transport, answer: bytes) -> None:
        """Write the canned answer, half-close, and keep reading (and dropping) for LINGER
        seconds so the kernel does not reset the connection under the answer."""
        transport.write(answer)
        self.close()  # no further requests; aiohttp drops what still arrives
        if transport.can_write_eof():
            transport.write_eof()
        self._linger = self._gloop.call_later(LINGER, self.force_close)
        # (eof_received then closes as soon as the client closes its side.)


def _peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


class _Busy(asyncio.Protocol):
    """A connection past max_connections: one canned 503, then closed. No request
    handler, no task, nothing parsed; what the client sends is dropped (LINGER)."""

    __slots__ = ("_drained", "_loop", "_timer", "_transport")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._drained = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport = transport
        transport.write(BUSY_503)
        if transport.can_write_eof():
            transport.write_eof()
        # Closed when the client closes its side, at the latest after LINGER.
        self._timer = self._loop.call_later(LINGER, transport.abort)

    def data_received(self, data: bytes) -> None:
        self._drained += len(data)
        if self._drained > LINGER_BYTES and self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


class GuardedServer(web.Server):
    """aiohttp's low-level server handing out GuardedHandler, or _Busy past the cap."""

    def __init__(
        self,
        handler: Any,
        *,
        limits: LimitsSettings,
        max_connections: int,
        proxies: TrustedProxies | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        request_factory: Any = None,
        handler_cancellation: bool = False,
        **kwargs: Any,
    ) -> None:
        self._gloop = loop or asyncio.get_running_loop()
        super().__init__(
            handler,
            request_factory=request_factory,
            handler_cancellation=handler_cancellation,
            loop=self._gloop,
            **kwargs,
        )
        self._limits = limits
        self._handler_options = kwargs
        self.max_connections = max_connections
        self.open_connections = 0
        self._proxies = proxies or TrustedProxies(())
        self._per_address: dict[str, int] = {}  # bucket -> open connections
        self._bucket_of: dict[web.RequestHandler, str] = {}
        self._peak = 0  # most open connections since the heap was last trimmed
        self._trim: asyncio.TimerHandle | None = None
        self._refusing = False

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        # Counted in connection_made/lost, so connections accepted in the same loop
        # iteration as the one that reaches the cap are still served (a few over).
        if self.open_connections >= self.max_connections:
            CLIENT_REFUSALS.labels("max_connections").inc()
            if not self._refusing:
                self._refusing = True
                log.warning(
                    "%d client connections open (limits.max_connections): new ones are "
                    "answered 503",
                    self.open_connections,
                )
            return _Busy(self._gloop)
        if self._refusing:
            self._refusing = False
            log.info("client connections below limits.max_connections again")
        return GuardedHandler(self, loop=self._gloop, limits=self._limits, **self._handler_options)

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        self.open_connections += 1
        self._peak = max(self._peak, self.open_connections)
        super().connection_made(handler, transport)
        cap = self._limits.connections_per_address
        peer = transport.get_extra_info("peername")
        if not cap or not isinstance(peer, tuple) or self._proxies.trusted(peer[0]):
            return
        key = bucket(peer[0])
        n = self._per_address.get(key, 0)
        self._per_address[key] = n + 1
        self._bucket_of[handler] = key
        if n >= cap and isinstance(handler, GuardedHandler):
            # One client cannot take every connection slot (nginx's limit_conn).
            handler.refuse_connection(
                TOO_MANY_429,
                "connections_per_address",
                f"more than {cap} connections from {key} (limits.connections_per_address)",
            )

    def connection_lost(
        self, handler: web.RequestHandler, exc: BaseException | None = None
    ) -> None:
        self.open_connections -= 1
        key = self._bucket_of.pop(handler, None)
        if key is not None:
            n = self._per_address[key] - 1
            if n:
                self._per_address[key] = n
            else:
                del self._per_address[key]
        if (
            self._trim is None
            and self._peak >= TRIM_MIN_PEAK
            and self.open_connections <= self._peak // 2
        ):
            # Once, shortly after the burst is over (its connections close together).
            self._trim = self._gloop.call_later(TRIM_DELAY, self._after_burst)
        super().connection_lost(handler, exc)

    def _after_burst(self) -> None:
        self._trim = None
        self._peak = self.open_connections
        _trim_heap()


def _load_malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_malloc_trim = _load_malloc_trim()


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system. After a burst of connections
    closes, glibc keeps what their buffers and parsers freed (1,000 connections holding
    a 64 KiB head each left ~100 MiB behind); it would be reused, but until then it
    counts as the process's memory. Takes some tens of ms per GiB, so it runs only
    after such a drop."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:  # e.g. hard is "unlimited", above the kernel's
            log.info("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft


def connection_cap(settings: Settings, fd_limit: int) -> int:
    """limits.max_connections, lowered so client connections cannot take the descriptors
    that upstream pools, Redis and the listeners need (at the limit every accept, and
    every new upstream or Redis connection, would fail)."""
    reserve = (
        sum(u.max_connections * len(u.servers) for u in settings.upstreams.values())
        + settings.redis.max_connections
        + FD_RESERVE_EXTRA
    )
    return max(1, min(settings.limits.max_connections, fd_limit - reserve))


class GatewayRunner(web.AppRunner):
    """AppRunner serving the app through GuardedServer (limits from settings)."""

    __slots__ = ("_settings",)

    def __init__(self, app: web.Application, settings: Settings, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._settings = settings

    async def _make_server(self) -> web.Server:
        # BaseRunner's documented extension point. aiohttp's own server is built first
        # (it also starts and freezes the app) for its handler, request factory and
        # handler options; it never accepts a connection.
        plain = await super()._make_server()
        limits = self._settings.limits
        cap = connection_cap(self._settings, raise_fd_limit())
        if cap < limits.max_connections:
            log.info(
                "client connections capped at %d (limits.max_connections %d does not fit "
                "the open-file limit less upstream and Redis connections)",
                cap,
                limits.max_connections,
            )
        # The gateway's app is served by its handler directly (app.direct_handler); any
        # other app through aiohttp's.
        handler = direct_handler(self._app) if RUNTIME in self._app else plain.request_handler
        return GuardedServer(
            handler,
            limits=limits,
            max_connections=cap,
            proxies=TrustedProxies(self._settings.trusted_proxies),
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            **_handler_kwargs(plain),
        )
