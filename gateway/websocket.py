"""WebSocket upgrades on routes with ``websocket: true``: the session is resolved at the
handshake (the backend sees the same X-Session-* headers), then frames are relayed both
ways until either side closes."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from .plugin import RequestContext
from .responses import text_response
from .upstream import upstream_url

if TYPE_CHECKING:
    from .proxy import Gateway
    from .routing import RouteTable


def is_websocket(request: web.Request) -> bool:
    return (
        request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


async def proxy_websocket(
    gw: Gateway, ctx: RequestContext, table: RouteTable
) -> web.StreamResponse:
    request = ctx.request
    # Check the client's handshake before opening anything upstream: a broken one must
    # not hold an upstream connection.
    if not web.WebSocketResponse().can_prepare(request).ok:
        return text_response(400, "bad request: invalid WebSocket handshake")
    upstream = table.upstreams[ctx.route.upstream]
    settings = upstream.settings
    headers = gw.outbound.build(ctx)
    for h in ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions"):
        headers.popall(h, None)
    protocols = [
        p.strip()
        for p in ",".join(headers.popall("Sec-WebSocket-Protocol", [])).split(",")
        if p.strip()
    ]
    upstream_ws: aiohttp.ClientWebSocketResponse | None = None
    for server in upstream.candidates():
        url = upstream_url(server, ctx.target)
        try:
            # The handshake is bounded like an upstream request (connect + read).
            async with asyncio.timeout(settings.connect_timeout + settings.read_timeout):
                upstream_ws = await gw.ws_client.ws_connect(
                    url,
                    headers=headers,
                    protocols=protocols,
                    timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                    autoping=True,
                )
            break
        except aiohttp.ClientConnectorError:
            upstream.eject(server)
            continue
        except aiohttp.WSServerHandshakeError as e:
            return text_response(502, f"bad gateway: upstream refused the WebSocket ({e.status})")
        except (aiohttp.ClientError, TimeoutError):
            return text_response(504, "gateway timeout: upstream WebSocket handshake")
    if upstream_ws is None:
        return text_response(502, "bad gateway: upstream refused the connection")
    gw.record_activity(ctx, 101)
    client_ws = web.WebSocketResponse(
        protocols=[upstream_ws.protocol] if upstream_ws.protocol else ()
    )
    try:
        await client_ws.prepare(request)
    except BaseException:
        await upstream_ws.close()
        raise

    async def pump(
        src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    ) -> None:
        async for msg in src:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            else:
                break
        await dst.close()

    async with upstream_ws:
        tasks = [
            asyncio.create_task(pump(client_ws, upstream_ws)),
            asyncio.create_task(pump(upstream_ws, client_ws)),
        ]
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        for t in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
    await client_ws.close()
    return client_ws
