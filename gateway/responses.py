"""The gateway's own short answers (errors, refusals): plain text, never a traceback."""

from __future__ import annotations

from aiohttp import web


def text_response(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=body + "\n", headers=headers)
