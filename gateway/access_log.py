"""The access log (``logging.access_log: true``): one JSON object per request on the
``gateway.access`` logger, written by the proxy once the answer is decided.

Fields: request_id, method, path (canonical, without the query: queries carry reset
tokens and the like), route, status, duration_ms, upstream (the server that answered),
session (the first 16 hex digits of the session's public id, a SHA-256 of the cookie
token: enough to find it with the admin API, never the token itself), client.

With ``logging.format: json`` the fields are the line's own keys; in text format the
message is the JSON object.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from .config import RouteSettings
from .plugin import RequestContext

log = logging.getLogger("gateway.access")

MAX_PATH = 256  # characters of the path logged
SESSION_ID_CHARS = 16


class AccessLog:
    def write(
        self,
        request: web.Request,
        route: RouteSettings | None,
        status: int,
        seconds: float,
        ctx: RequestContext | None,
        request_id: str,
    ) -> None:
        session = ctx.session if ctx is not None else None
        doc: dict[str, object] = {
            "request_id": request_id,
            "method": request.method,
            # Before a route was chosen the path is the client's spelling, maybe
            # refused for what it holds: its repr keeps the line one printable line.
            "path": ctx.path[:MAX_PATH] if ctx is not None else repr(request.path[:MAX_PATH]),
            "route": route.path if route is not None else None,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "upstream": (ctx.upstream_server or None) if ctx is not None else None,
            "session": session.id[:SESSION_ID_CHARS] if session is not None else None,
            "client": ctx.client_address if ctx is not None else request.remote,
        }
        log.info("%s", orjson.dumps(doc).decode(), extra={"access": doc})
