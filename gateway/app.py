"""The proxy's aiohttp application: the runtime's resources in cleanup_ctx (runtime.py),
one catch-all handler, and the options every runner of it uses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from .config import Settings
from .runtime import CONTEXTS, RUNTIME, Runtime

__all__ = ["RUNTIME", "build_app", "direct_handler", "server_kwargs"]

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


async def _proxy(request: web.Request) -> web.StreamResponse:
    return await request.app[RUNTIME].gateway.handle(request)


async def _expect(request: web.BaseRequest) -> None:
    """What aiohttp's Application does with ``Expect`` before a handler runs (its
    default expect handler): ``100-continue`` on HTTP/1.1 is answered at once, anything
    else is 417."""
    if request.version != HttpVersion11:
        return
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    # The interim answer is not part of the response's size (as aiohttp does).
    request.writer.output_size = 0
    await request.writer.drain()


def direct_handler(app: web.Application) -> Handler:
    """The handler the gateway's server runs for every request: the gateway itself,
    without aiohttp's Application._handle and URL dispatcher in between. The app has one
    catch-all route, no middlewares and no sub-apps, so their work (a regex match, a
    match-info object, freezing it, the middleware walk) decided nothing; it was ~6 % of
    the CPU per proxied request in a py-spy profile of the benchmark. What they did that
    matters, the answer to ``Expect``, is done here the same way. The app is still
    started and cleaned up by the runner (cleanup_ctx), and tests that serve it through
    aiohttp's own TestServer reach the same gateway through ``_proxy``."""
    runtime = app[RUNTIME]

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.headers.get(hdrs.EXPECT):
            await _expect(request)
        # Looked up per request: a reload changes the gateway in place (reload.py), and
        # the app's request factory builds web.Request objects.
        return await runtime.gateway.handle(cast(web.Request, request))

    return handle


def server_kwargs(settings: Settings) -> dict[str, Any]:
    """Options for aiohttp's request handler; every runner of the gateway app uses them
    (server.GatewayRunner in production, testing.GatewayTestServer in tests)."""
    return {
        # Bodies pass through as sent: aiohttp would otherwise inflate a gzip upload and
        # forward it under its original Content-Encoding and Content-Length.
        "auto_decompress": False,
        "max_field_size": settings.max_request_header_size,
        "max_line_size": settings.max_request_header_size,
        # A head is bounded as a whole by limits.max_header_bytes (server.py); aiohttp's
        # count of header lines must not refuse a smaller head first. The shortest line
        # is 4 bytes ("a:\r\n").
        "max_headers": settings.limits.max_header_bytes // 4,
        # Idle keep-alive connections, and connections that never send, are closed after
        # this (aiohttp's default is an hour).
        "keepalive_timeout": settings.limits.keepalive_timeout,
        # The gateway writes its own access line (access_log.py: route, upstream server,
        # session id), when logging.access_log asks for it.
        "access_log": None,
    }


def build_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=0)
    app[RUNTIME] = Runtime(settings)
    app.cleanup_ctx.extend(CONTEXTS)
    # One catch-all handler: routing is the gateway's own (longest prefix, methods, host),
    # and aiohttp's router must not normalise or reject paths the backend should see. The
    # pattern matches every character, a decoded newline (%0a) included, so that the
    # gateway's own path checks see every request.
    app.router.add_route("*", r"/{tail:[\s\S]*}", _proxy)
    return app
