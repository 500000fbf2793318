"""The gateway's own short answers (errors, refusals): plain text, never a traceback."""

from __future__ import annotations

from aiohttp import web


def text_response(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=body + "\n", headers=headers)


def unavailable(what: str = "service unavailable") -> web.Response:
    """503 with Retry-After: a dependency (Redis, a plugin) cannot serve this request now."""
    return text_response(503, what, {"Retry-After": "5"})
