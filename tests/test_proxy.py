"""Proxying: methods, bytes passed exactly, streaming, upstream failures, WebSocket."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.plugin import Plugin, RequestContext, ResponseHead

from .conftest import (
    GatewayFactory,
    RedisServer,
    Upstream,
    base_config,
    free_port,
    login,
    raw_request,
    start_backend,
    status_of,
)


async def test_path_and_query_pass_byte_exact(gw: TestClient, upstream: Upstream) -> None:
    assert gw.port is not None
    target = b"/static/a%2Fb/c%20d;p=1?x=1&y=%41&z=%2f&&w=a+b&q=%E2%82%AC"
    raw = await raw_request(
        gw.port, b"GET " + target + b" HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n"
    )
    assert status_of(raw) == 200
    assert upstream.last.raw_path == target.decode()


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"])
async def test_every_method_is_forwarded(gw: TestClient, upstream: Upstream, method: str) -> None:
    resp = await gw.request(method, "/static/m", data=b"payload" if method != "GET" else None)
    assert resp.status == 200
    assert upstream.last.method == method
    if method != "GET":
        assert upstream.last.body == b"payload"


async def test_head_gets_headers_without_body(gw: TestClient, upstream: Upstream) -> None:
    resp = await gw.head("/static/h")
    assert resp.status == 200
    assert upstream.last.method == "HEAD"
    assert await resp.read() == b""


async def test_status_headers_and_body_come_back(gw: TestClient, upstream: Upstream) -> None:
    async def teapot(request: web.Request) -> web.StreamResponse:
        r = web.Response(status=418, reason="I'm a teapot", body=b"\x00\x01binary")
        r.headers.add("X-Multi", "1")
        r.headers.add("X-Multi", "2")
        r.headers["Cache-Control"] = "no-store"
        return r

    upstream.routes["/static/teapot"] = teapot
    resp = await gw.get("/static/teapot")
    assert resp.status == 418
    assert resp.reason == "I'm a teapot"
    assert resp.headers.getall("X-Multi") == ["1", "2"]
    assert resp.headers["Cache-Control"] == "no-store"
    assert await resp.read() == b"\x00\x01binary"


async def test_redirects_are_not_followed(gw: TestClient, upstream: Upstream) -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "/static/elsewhere"})

    upstream.routes["/static/r"] = redirect
    resp = await gw.get("/static/r", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/static/elsewhere"
    assert [r.raw_path for r in upstream.received] == ["/static/r"]


async def test_bodies_are_not_decompressed(gw: TestClient, upstream: Upstream) -> None:
    payload = gzip.compress(b"x" * 10000)

    async def gz(request: web.Request) -> web.StreamResponse:
        return web.Response(body=payload, headers={"Content-Encoding": "gzip"})

    upstream.routes["/static/gz"] = gz
    resp = await gw.get("/static/gz", auto_decompress=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    assert await resp.read() == payload
    # The request side too: an encoded upload reaches the backend as sent.
    await gw.post("/static/up", data=payload, headers={"Content-Encoding": "gzip"})
    assert upstream.last.body == payload
    assert upstream.last.header("Content-Encoding") == "gzip"


async def test_forwarding_headers(gw: TestClient, upstream: Upstream) -> None:
    await gw.get(
        "/static/f", headers={"Host": "shop.example:8443", "X-Request-Id": "abcdefgh-1234"}
    )
    got = upstream.last
    assert got.header("X-Forwarded-For") == "127.0.0.1"
    assert got.header("X-Forwarded-Proto") == "http"
    assert got.header("X-Forwarded-Host") == "shop.example:8443"
    assert got.header("X-Request-Id") == "abcdefgh-1234"


async def test_request_id_is_generated_and_returned(gw: TestClient, upstream: Upstream) -> None:
    resp = await gw.get("/static/id")
    rid = upstream.last.header("X-Request-Id")
    assert rid and len(rid) >= 16
    assert resp.headers["X-Request-Id"] == rid


async def test_unknown_route_is_404(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream
) -> None:
    cfg = base_config(redis_server.url, upstream.url)
    cfg["routes"] = [{"path": "/only/", "upstream": "app", "session": "none"}]
    client = await make_gateway(cfg)
    resp = await client.get("/other")
    assert resp.status == 404
    assert upstream.received == []


# -- streaming ---------------------------------------------------------------------------


def _rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
async def test_large_upload_and_download_stream_with_bounded_memory(
    gw: TestClient, upstream: Upstream
) -> None:
    """512 MiB each way through the gateway (in this process) must not be buffered: the
    process grows by far less than the body size."""
    size = 512 * 1024 * 1024
    chunk = os.urandom(1024 * 1024)

    async def sink(request: web.Request) -> web.StreamResponse:
        h = hashlib.sha256()
        n = 0
        async for part in request.content.iter_chunked(1 << 16):
            h.update(part)
            n += len(part)
        return web.json_response({"n": n, "sha": h.hexdigest()})

    sink.streaming = True  # type: ignore[attr-defined]

    async def source(request: web.Request) -> web.StreamResponse:
        r = web.StreamResponse()
        r.content_length = size
        await r.prepare(request)
        for _ in range(size // len(chunk)):
            await r.write(chunk)
        await r.write_eof()
        return r

    source.streaming = True  # type: ignore[attr-defined]
    upstream.routes["/static/sink"] = sink
    upstream.routes["/static/source"] = source

    async def gen() -> object:
        for _ in range(size // len(chunk)):
            yield chunk

    expected = hashlib.sha256()
    for _ in range(size // len(chunk)):
        expected.update(chunk)
    before = _rss_mib()
    samples: list[float] = []

    async def sample() -> None:
        # RSS while the bodies are in flight, not only after: a gateway that buffered a
        # body and freed it at the end would pass an after-the-fact check.
        while True:
            samples.append(_rss_mib())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        resp = await gw.post("/static/sink", data=gen(), headers={"Content-Length": str(size)})
        assert await resp.json() == {"n": size, "sha": expected.hexdigest()}

        resp = await gw.get("/static/source")
        assert resp.headers["Content-Length"] == str(size)
        h = hashlib.sha256()
        n = 0
        async for part in resp.content.iter_chunked(1 << 16):
            h.update(part)
            n += len(part)
        assert n == size and h.hexdigest() == expected.hexdigest()
    finally:
        sampler.cancel()
    # Client, gateway and upstream share this process; 512 MiB buffered anywhere would show.
    assert len(samples) > 10
    assert max(samples) - before < 150, (before, max(samples))


async def test_chunked_upload_is_streamed_to_upstream(gw: TestClient, upstream: Upstream) -> None:
    async def gen() -> object:
        for i in range(5):
            yield f"part{i};".encode()

    resp = await gw.post("/static/chunked", data=gen())
    assert resp.status == 200
    assert upstream.last.body == b"part0;part1;part2;part3;part4;"


# -- upstream failures ---------------------------------------------------------------------


async def test_refused_upstream_is_502(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    client = await make_gateway(base_config(redis_server.url, dead))
    resp = await client.get("/static/x")
    assert resp.status == 502
    body = await resp.text()
    assert "bad gateway" in body and "Traceback" not in body


async def test_slow_upstream_is_504(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream
) -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.Response(text="late")

    upstream.routes["/static/stall"] = stall
    cfg = base_config(redis_server.url, upstream.url)
    cfg["upstreams"]["app"]["read_timeout"] = 0.3
    client = await make_gateway(cfg)
    resp = await client.get("/static/stall")
    assert resp.status == 504
    assert "timeout" in await resp.text()


async def test_round_robin_ejection_and_retry(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    hits: dict[str, int] = {"a": 0, "b": 0}
    servers = []
    for name in ("a", "b"):

        async def h(request: web.Request, name: str = name) -> web.Response:
            hits[name] += 1
            return web.Response(text=name)

        servers.append(await start_backend(h))
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = base_config(redis_server.url, servers[0][1])
    cfg["upstreams"]["app"]["servers"] = [servers[0][1], dead, servers[1][1]]
    client = await make_gateway(cfg)
    try:
        bodies = [await (await client.get("/static/rr")).text() for _ in range(12)]
        # Every request succeeded: the dead server's turn was retried on the next one.
        assert set(bodies) == {"a", "b"}
        assert hits["a"] + hits["b"] == 12
        assert abs(hits["a"] - hits["b"]) <= 4
        # A POST on connection refusal is retried too (nothing was sent), and succeeds.
        for _ in range(3):
            assert (await client.post("/static/rr", data=b"x")).status == 200
    finally:
        for runner, _ in servers:
            await runner.cleanup()


def cut_short(
    declared: int, sent: int, headers: dict[str, str] | None = None
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An upstream handler that declares ``declared`` body bytes, sends ``sent`` of them
    and closes the connection."""

    async def handler(request: web.Request) -> web.StreamResponse:
        r = web.StreamResponse(headers=headers)
        r.content_length = declared
        await r.prepare(request)
        await r.write(b"x" * sent)
        assert request.transport is not None
        request.transport.close()
        return r

    handler.streaming = True  # type: ignore[attr-defined]
    return handler


@pytest.mark.parametrize(("declared", "sent"), [(1000, 100), (4 << 20, 256 << 10)])
async def test_upstream_closing_mid_body(
    gw: TestClient, upstream: Upstream, declared: int, sent: int
) -> None:
    """A small body is read before anything is sent, so a failure is a clean 502; a
    large one is already streaming, so the client's connection is cut (never a silently
    short response)."""
    upstream.routes["/static/broken"] = cut_short(declared, sent)
    resp = await gw.get("/static/broken")
    if declared <= 64 * 1024:
        assert resp.status == 502
        assert "incomplete" in await resp.text()
    else:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_login_applied_before_a_broken_body_still_sets_its_cookie(
    gw: TestClient, upstream: Upstream
) -> None:
    """The login is in Redis once the headers arrive; a 502 for the body that then breaks
    must still hand the client its new cookie."""

    upstream.routes["/login"] = cut_short(1000, 100, {"X-Session-Login": "user_id=42"})
    resp = await gw.post("/login")
    assert resp.status == 502
    assert resp.cookies["sid"].value
    await gw.get("/after")
    assert upstream.last.header("X-Session-User-Id") == "42"


# -- WebSocket ----------------------------------------------------------------------------


async def test_websocket_proxied_with_session_at_handshake(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream
) -> None:
    seen: dict[str, str] = {}

    async def ws_handler(request: web.Request) -> web.StreamResponse:
        seen.update({k: v for k, v in request.headers.items() if k.lower().startswith("x-session")})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    ws_handler.streaming = True  # type: ignore[attr-defined]
    upstream.routes["/ws/chat"] = ws_handler
    cfg = base_config(redis_server.url, upstream.url)
    cfg["routes"].insert(0, {"path": "/ws/", "upstream": "app", "websocket": True})
    client = await make_gateway(cfg)
    await login(client, upstream, "99")
    async with client.ws_connect("/ws/chat") as ws:
        await ws.send_str("hi")
        assert (await ws.receive()).data == "echo:hi"
        await ws.send_bytes(b"abc")
        assert (await ws.receive()).data == b"cba"
    assert seen.get("X-Session-User-Id") == "99"
    assert seen.get("X-Session-Authenticated") == "true"


async def test_websocket_refused_on_routes_without_it(gw: TestClient, upstream: Upstream) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError):
        async with gw.ws_connect("/static/ws"):
            pass
    # The upgrade headers were stripped: the backend saw a plain GET.
    assert upstream.last.header("Upgrade") is None


async def test_idempotent_request_retried_when_a_server_drops_it(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream
) -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()  # read the request, answer nothing

    dropper = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = dropper.sockets[0].getsockname()[1]
    cfg = base_config(redis_server.url, upstream.url)
    cfg["upstreams"]["app"]["servers"] = [f"http://127.0.0.1:{port}", upstream.url]
    client = await make_gateway(cfg)
    try:
        for _ in range(4):  # whichever server's turn it is, GET succeeds
            assert (await client.get("/static/g")).status == 200
        # A POST that reached the dropping server is not replayed: 502 on its turn.
        statuses = {(await client.post("/static/p", data=b"x")).status for _ in range(4)}
        assert statuses == {200, 502}
    finally:
        dropper.close()
        await dropper.wait_closed()


class TapBoom(Plugin):
    """Fails while the body is being streamed (after the headers went out)."""

    async def response(self, ctx: RequestContext, head: ResponseHead) -> None:
        def tap(chunk: bytes | None) -> None:
            raise RuntimeError("tap failed")

        ctx.body_tap = tap


async def test_failure_after_headers_cuts_instead_of_a_second_response(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    size = 1 << 20

    async def big(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"y" * size)

    upstream.routes["/static/big"] = big
    client = await make_gateway(plugins=["tests.test_proxy:TapBoom"])
    resp = await client.get("/static/big")
    assert resp.status == 200
    # Bounded: a gateway that wrote a second response into the body would leave the
    # client waiting for bytes that never come.
    async with asyncio.timeout(10):
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    # The next request gets its own clean answer (a small body fails before the headers,
    # so that one is a proper 500), not the leftovers of a desynchronised connection.
    other = await client.get("/static/other")
    assert other.status == 500
    assert await other.text() == "gateway error\n"
