"""The proxy's aiohttp application: the runtime's resources in cleanup_ctx (runtime.py),
one catch-all handler, and the options every runner of it uses."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .config import Settings
from .runtime import CONTEXTS, RUNTIME, Runtime

__all__ = ["RUNTIME", "build_app", "server_kwargs"]


async def _proxy(request: web.Request) -> web.StreamResponse:
    return await request.app[RUNTIME].gateway.handle(request)


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
