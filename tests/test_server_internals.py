"""What gateway/server.py relies on in aiohttp's private protocol internals (3.14).

If an aiohttp upgrade renames or changes any of it, these fail here, by name, rather
than the limits silently stop working. Real sockets: the handler under test is
connected to one end of a socket pair.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import StreamReader, web
from aiohttp.http import RawRequestMessage
from aiohttp.test_utils import TestServer

from gateway import server

pytestmark = pytest.mark.security  # both HTTP parsers


class Recording(web.RequestHandler):
    """aiohttp's handler, recording the data_received calls aiohttp makes itself."""

    __slots__ = ("calls",)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.calls.append(data)
        super().data_received(data)


async def ok(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response(text="ok")


@pytest.fixture
async def handler() -> AsyncIterator[tuple[Recording, socket.socket]]:
    """A live aiohttp RequestHandler on one end of a socket pair; the test holds the
    other end as the client."""
    loop = asyncio.get_running_loop()
    manager = web.Server(ok, keepalive_timeout=7.5)
    ours, theirs = socket.socketpair()
    h = Recording(manager, loop=loop, keepalive_timeout=7.5)
    await loop.connect_accepted_socket(lambda: h, ours)
    theirs.setblocking(False)
    await asyncio.sleep(0)  # the handler task starts and waits for a request
    yield h, theirs
    h.force_close()
    theirs.close()


async def test_a_parsed_head_is_counted_and_queued(
    handler: tuple[Recording, socket.socket],
) -> None:
    h, _ = handler
    assert server._parsed(h) == 0 and server._last_message(h) is None
    h.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Len")
    assert server._parsed(h) == 0
    h.data_received(b"gth: 5\r\n\r\n")
    assert server._parsed(h) == 1
    newest = server._last_message(h)
    assert newest is not None
    msg, payload = newest
    assert isinstance(msg, RawRequestMessage) and msg.headers["Content-Length"] == "5"
    assert isinstance(payload, StreamReader) and not payload.is_eof()
    h.data_received(b"he")
    assert payload.total_bytes == 2 and server._parsed(h) == 1


async def test_a_parse_error_is_a_message_that_is_not_a_request(
    handler: tuple[Recording, socket.socket],
) -> None:
    h, _ = handler
    h.data_received(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert server._parsed(h) == 1
    newest = server._last_message(h)
    assert newest is not None and not isinstance(newest[0], RawRequestMessage)


async def test_idle_means_waiting_for_a_request(
    handler: tuple[Recording, socket.socket],
) -> None:
    h, _ = handler
    assert server._idle(h) and server._counting(h)
    h.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert not server._idle(h)  # queued, about to be handled
    await asyncio.sleep(0.05)
    assert server._idle(h)
    h.close()
    assert not server._counting(h)


async def test_an_upgrade_stops_counting(handler: tuple[Recording, socket.socket]) -> None:
    h, _ = handler
    h.data_received(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    assert not server._counting(h)


async def test_full_queue_pauses_reading_and_resumes_through_data_received(
    handler: tuple[Recording, socket.socket],
) -> None:
    """Past the queue limit aiohttp pauses reading; once its handler task drained the
    queue it calls data_received(b"") (where the gateway hands over what it held)."""
    h, _ = handler
    assert h.transport is not None
    for i in range(40):
        h.data_received(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
        if server._queue_full(h):
            break
    assert server._queue_full(h) and i + 1 == h._max_msg_queue_size
    assert not h.transport.is_reading()
    h.calls.clear()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if b"" in h.calls:
            break
    assert b"" in h.calls
    assert not server._queue_full(h) and h.transport.is_reading()


async def test_the_server_keeps_the_handler_options() -> None:
    s = web.Server(ok, keepalive_timeout=7.5, max_headers=999)
    assert server._handler_kwargs(s) == {"keepalive_timeout": 7.5, "max_headers": 999}
    assert s.request_handler is ok and callable(s.request_factory)
    assert s.handler_cancellation is False


def test_runner_and_test_server_extension_points() -> None:
    assert inspect.iscoroutinefunction(web.AppRunner._make_server)
    assert "_make_server" in web.BaseRunner.__abstractmethods__
    assert inspect.iscoroutinefunction(TestServer._make_runner)
    # TestServer.start_server builds its runner through _make_runner.
    assert "_make_runner" in inspect.getsource(TestServer.start_server)


async def test_the_guarded_server_is_what_the_runner_serves() -> None:
    from gateway.config import parse_settings

    settings = parse_settings(
        {
            "upstreams": {"app": {"servers": ["http://127.0.0.1:9"]}},
            "routes": [{"path": "/", "upstream": "app"}],
        }
    )
    app = web.Application()
    app.router.add_get("/", ok)
    runner = server.GatewayRunner(app, settings, keepalive_timeout=7.5)
    await runner.setup()
    try:
        guarded = runner.server
        assert isinstance(guarded, server.GuardedServer)
        h = guarded()
        assert isinstance(h, server.GuardedHandler) and h.keepalive_timeout == 7.5
    finally:
        await runner.cleanup()


async def test_pipelined_heads_past_the_queue_limit_are_held_not_parsed() -> None:
    """GuardedHandler feeds no further heads once aiohttp's queue is full (fed head by
    head, the C parser would otherwise parse every request of the read)."""
    from gateway.config import LimitsSettings

    loop = asyncio.get_running_loop()
    manager = web.Server(ok)
    ours, theirs = socket.socketpair()
    h = server.GuardedHandler(manager, loop=loop, limits=LimitsSettings())
    await loop.connect_accepted_socket(lambda: h, ours)
    try:
        h.data_received(b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(100)))
        assert len(h._messages) == h._max_msg_queue_size
        assert h._held is not None and h._held.startswith(b"GET /32 ")
    finally:
        h.force_close()
        theirs.close()
