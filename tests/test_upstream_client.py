"""The proxy's own upstream connection pool (gateway/upstream_client.py), against real
servers: keep-alive reuse, a bounded wait when every connection is busy, connections the
backend closed while idle, interim 1xx answers, and bodies framed every legal way."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from .conftest import (
    GatewayFactory,
    RedisServer,
    base_config,
    raw_request,
    start_backend,
    status_of,
)

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
RawBackend = Callable[[RawHandler], Awaitable[str]]


@pytest.fixture
async def raw_backend() -> AsyncIterator[RawBackend]:
    """A backend that answers with bytes written by the test (shapes aiohttp won't send)."""
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for s in servers:
        s.close()
        await s.wait_closed()


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def test_connections_are_kept_alive_and_reused(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    peers: list[tuple[str, int]] = []

    async def h(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    runner, url = await start_backend(h)
    try:
        client = await make_gateway(base_config(redis_server.url, url))
        for _ in range(20):
            resp = await client.get("/static/x")
            assert resp.status == 200 and await resp.text() == "ok"
        assert len(peers) == 20
        assert len(set(peers)) == 1, f"{len(set(peers))} upstream connections for 20 requests"
    finally:
        await runner.cleanup()


async def test_every_connection_busy_is_a_timely_504_then_recovers(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    release, holding = asyncio.Event(), asyncio.Event()

    async def h(request: web.Request) -> web.Response:
        if request.path == "/static/slow":
            holding.set()
            await release.wait()
        return web.Response(text=request.path)

    runner, url = await start_backend(h)
    try:
        cfg = base_config(redis_server.url, url)
        cfg["upstreams"]["app"].update(max_connections=1, connect_timeout=0.3)
        client = await make_gateway(cfg)
        slow = asyncio.create_task(client.get("/static/slow"))
        await holding.wait()  # the only connection is taken
        t0 = time.monotonic()
        waited = await client.get("/static/fast")
        assert waited.status == 504, await waited.text()
        assert time.monotonic() - t0 < 2.0
        release.set()
        assert (await slow).status == 200
        # The one connection is free again and serves the next request.
        again = await client.get("/static/fast")
        assert again.status == 200 and await again.text() == "/static/fast"
    finally:
        release.set()
        await runner.cleanup()


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_connection_closed_by_the_backend_while_idle_is_not_reused(
    make_gateway: GatewayFactory, redis_server: RedisServer, method: str
) -> None:
    """POST can only pass if the closed connection is not reused (it is never retried);
    GET would also pass through the stale-connection retry, so for GET this checks the
    answer, not the idle check."""

    async def h(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.method} {len(await request.read())}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", h)
    # The backend drops idle keep-alive connections after 0.2 s.
    runner = web.AppRunner(app, keepalive_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        client = await make_gateway(base_config(redis_server.url, f"http://127.0.0.1:{port}"))
        for _ in range(3):
            data = b"abc" if method == "POST" else None
            resp = await client.request(method, "/static/x", data=data)
            assert resp.status == 200, await resp.text()
            assert await resp.text() == f"{method} {3 if method == 'POST' else 0}"
            await asyncio.sleep(0.5)
    finally:
        await runner.cleanup()


async def test_interim_1xx_answers_are_skipped(
    make_gateway: GatewayFactory, redis_server: RedisServer, raw_backend: RawBackend
) -> None:
    async def h(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Real: yes\r\n\r\ndone"
        )
        await writer.drain()
        writer.close()

    url = await raw_backend(h)
    client = await make_gateway(base_config(redis_server.url, url))
    resp = await client.get("/static/x")
    assert resp.status == 201
    assert resp.headers["X-Real"] == "yes"
    assert await resp.text() == "done"


@pytest.mark.security
async def test_one_kept_alive_connection_frames_every_answer_after_another(
    make_gateway: GatewayFactory, redis_server: RedisServer, raw_backend: RawBackend
) -> None:
    """Every answer on one kept-alive connection is framed as its own, whatever came
    before it: a HEAD answer's Content-Length read as a body would swallow the next
    answer (a response desync), a GET read with HEAD's parser would lose its body."""
    connections = 0
    answers = {
        b"GET /static/chunked ": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"HEAD /static/head ": b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Head: 1\r\n\r\n",
        b"GET /static/length ": b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nlength",
        b"GET /static/interim ": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ninterim",
        b"GET /static/empty ": b"HTTP/1.1 204 No Content\r\n\r\n",
    }

    async def h(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await _read_head(reader)
                writer.write(next(a for k, a in answers.items() if head.startswith(k)))
                await writer.drain()

    url = await raw_backend(h)
    client = await make_gateway(base_config(redis_server.url, url))
    expected = [
        ("GET", "/static/chunked", 200, b"hello"),
        ("HEAD", "/static/head", 200, b""),
        ("HEAD", "/static/head", 200, b""),
        ("GET", "/static/length", 200, b"length"),
        ("GET", "/static/interim", 200, b"interim"),
        ("HEAD", "/static/head", 200, b""),
        ("GET", "/static/empty", 204, b""),
        ("GET", "/static/chunked", 200, b"hello"),
    ]
    for method, path, status, body in expected:
        resp = await client.request(method, path)
        assert (resp.status, await resp.read()) == (status, body), (method, path)
        if method == "HEAD":
            assert resp.headers["X-Head"] == "1" and resp.headers["Content-Length"] == "11"
    assert connections == 1, f"{connections} upstream connections for {len(expected)} requests"


@pytest.mark.security
async def test_a_partial_answer_left_behind_is_not_spliced_onto_the_next(
    make_gateway: GatewayFactory, redis_server: RedisServer, raw_backend: RawBackend
) -> None:
    """A backend (confused, or owned) sends a whole answer and then the start of another
    on a keep-alive connection: a status line and headers without their end. The pool
    reuses the connection (nothing whole is left over), so the next request's answer
    must be parsed from scratch: glued onto those bytes, the next client would get the
    leftover status and headers, here a login instruction, over its own body."""
    connections = 0

    async def h(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            head = await _read_head(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
                b"HTTP/1.1 200 OK\r\nX-Session-Login: user_id=666\r\nX-Pad: "
            )
            await writer.drain()
            while True:
                head = await _read_head(reader)
                assert head.startswith(b"GET /")
                writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 6\r\n\r\nsecond")
                await writer.drain()

    url = await raw_backend(h)
    cfg = base_config(redis_server.url, url)
    cfg["routes"] = [{"path": "/", "upstream": "app", "session": "optional",
                      "instructions": ["login"]}]  # fmt: skip
    client = await make_gateway(cfg)
    resp = await client.get("/first")
    assert (resp.status, await resp.read()) == (200, b"first")
    await asyncio.sleep(0.1)  # the leftover has surely arrived
    resp = await client.get("/second")
    assert (resp.status, await resp.read()) == (202, b"second")
    assert "X-Pad" not in resp.headers and "sid" not in resp.cookies
    with redis_server.client() as c:
        assert not c.keys("session:*"), "a login was spliced in"
    assert connections == 1


async def test_body_until_close_and_chunked_answers(
    make_gateway: GatewayFactory, redis_server: RedisServer, raw_backend: RawBackend
) -> None:
    async def h(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await _read_head(reader)
        if b" /static/eof " in head:
            # HTTP/1.0-style: no length, the body ends when the connection closes.
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 100_000)
        else:
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
        await writer.drain()
        writer.close()

    url = await raw_backend(h)
    client = await make_gateway(base_config(redis_server.url, url))
    resp = await client.get("/static/eof")
    assert resp.status == 200 and await resp.read() == b"x" * 100_000
    resp = await client.get("/static/chunked")
    assert resp.status == 200 and await resp.text() == "hello world"


async def test_request_framing_towards_the_backend(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    seen: list[dict[str, str | None]] = []

    async def h(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(
            {
                "content-length": request.headers.get("Content-Length"),
                "transfer-encoding": request.headers.get("Transfer-Encoding"),
                "expect": request.headers.get("Expect"),
                "host": request.headers.get("Host"),
                "body": body.decode(),
            }
        )
        return web.Response(text="ok")

    runner, url = await start_backend(h)
    try:
        client = await make_gateway(base_config(redis_server.url, url))
        port = client.server.port
        assert port is not None
        # A POST without a body (and without Content-Length from the client) still says
        # so: some servers answer 411 otherwise.
        raw = await raw_request(
            port, b"POST /static/a HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n"
        )
        assert status_of(raw) == 200
        assert seen[-1]["content-length"] == "0" and seen[-1]["body"] == ""
        # The gateway answered the client's Expect itself; the backend gets the body.
        raw = await raw_request(
            port,
            b"POST /static/b HTTP/1.1\r\nHost: shop\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\nhello",
        )
        assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), raw[:80]
        raw = raw.split(b"\r\n\r\n", 1)[1]
        assert status_of(raw) == 200
        assert seen[-1]["expect"] is None and seen[-1]["body"] == "hello"
        assert seen[-1]["content-length"] == "5"
        # An expectation the gateway cannot meet is refused before the backend sees it.
        before = len(seen)
        raw = await raw_request(
            port,
            b"POST /static/b HTTP/1.1\r\nHost: shop\r\nExpect: 200-ok\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\nhello",
        )
        assert status_of(raw) == 417 and len(seen) == before
        # A small chunked upload is read whole first and goes with its length.
        raw = await raw_request(
            port,
            b"POST /static/c HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        assert status_of(raw) == 200
        assert seen[-1]["transfer-encoding"] is None and seen[-1]["body"] == "abcde"
        assert seen[-1]["content-length"] == "5"
        # One larger than limits.buffer_body_bytes streams, and so stays chunked.
        big = b"".join(b"1000\r\n" + b"q" * 4096 + b"\r\n" for _ in range(20))
        raw = await raw_request(
            port,
            b"POST /static/c HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + big + b"0\r\n\r\n",
        )
        assert status_of(raw) == 200
        assert seen[-1]["transfer-encoding"] == "chunked"
        assert seen[-1]["body"] == "q" * 4096 * 20
        # Host is the upstream server's, as a proxy_pass with a host:port would send it.
        assert seen[-1]["host"] == url.removeprefix("http://")
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("method", "expected"), [("GET", 200), ("POST", 502)])
async def test_pooled_connection_dropped_as_it_is_used(
    make_gateway: GatewayFactory,
    redis_server: RedisServer,
    raw_backend: RawBackend,
    method: str,
    expected: int,
) -> None:
    """The backend closes a kept-alive connection just as the next request arrives on it
    (the keep-alive race): a request that is safe to repeat goes out again on a new
    connection; one that is not gets a 502 rather than being sent twice."""
    served: list[bytes] = []

    async def h(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await _read_head(reader)
        length = (
            int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
            if (b"Content-Length: " in head)
            else 0
        )
        await reader.readexactly(length)
        served.append(head.split(b"\r\n", 1)[0])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        await writer.drain()
        # The second request on this connection is read, then dropped unanswered.
        with contextlib.suppress(asyncio.IncompleteReadError):
            await _read_head(reader)
        writer.close()

    url = await raw_backend(h)
    client = await make_gateway(base_config(redis_server.url, url))
    assert (await client.request(method, "/static/a", data=b"x")).status == 200
    resp = await client.request(method, "/static/b", data=b"y" if method == "POST" else None)
    assert resp.status == expected, await resp.text()
    if method == "GET":
        assert await resp.text() == "first"
        assert served == [b"GET /static/a HTTP/1.1", b"GET /static/b HTTP/1.1"]
    else:
        assert served == [b"POST /static/a HTTP/1.1"]  # never sent twice
