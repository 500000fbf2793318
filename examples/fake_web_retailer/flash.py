"""Two small cookies of the shop's own, kept by the browser (never a session write):

- ``fwr_flash``: a one-line message for the next page ("You are logged out."), set by an
  action and cleared by the page that shows it;
- ``fwr_last_action``: what the shop answered its last action with (method, path,
  status and the ``X-Session-*`` instructions it sent the gateway), for the inspector.

Both are readable only by the shop (HttpOnly) and hold nothing secret: the visitor's own
username and email at most.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

FLASH_COOKIE = "fwr_flash"
LAST_ACTION_COOKIE = "fwr_last_action"
MAX_COOKIE = 3000  # bytes of a cookie value: browsers keep 4096 per cookie
_FLASH_TAKEN = web.RequestKey("flash_taken", bool)


def _encode(data: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _decode(value: str | None) -> Any:
    if not value or len(value) > MAX_COOKIE:
        return None
    try:
        return json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (ValueError, binascii.Error):
        return None


def _set(response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, path="/", max_age=max_age, httponly=True, samesite="Lax")


def flash(response: web.StreamResponse, message: str) -> None:
    """Show ``message`` on the next page that has a layout."""
    _set(response, FLASH_COOKIE, _encode(message[:300]), 60)


def take_flash(request: web.Request) -> str | None:
    """The pending message, once: the page showing it clears it (``clear_taken``)."""
    message = _decode(request.cookies.get(FLASH_COOKIE))
    if isinstance(message, str) and message:
        request[_FLASH_TAKEN] = True
        return message
    return None


@dataclass(frozen=True, slots=True)
class LastAction:
    at: float
    method: str
    path: str
    status: int
    instructions: tuple[tuple[str, str], ...]


def last_action(request: web.Request) -> LastAction | None:
    data = _decode(request.cookies.get(LAST_ACTION_COOKIE))
    try:
        return LastAction(
            float(data["at"]),
            str(data["method"]),
            str(data["path"]),
            int(data["status"]),
            tuple((str(k), str(v)) for k, v in data["instructions"]),
        )
    except (TypeError, KeyError, ValueError):
        return None


@web.middleware
async def cookies_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Clears a flash that was shown; records the answer to every action (a POST)."""
    response = await handler(request)
    if request.get(_FLASH_TAKEN):
        response.del_cookie(FLASH_COOKIE, path="/")
    if request.method == "POST":
        sent = [
            (name, value)
            for name, value in response.headers.items()
            if name.lower().startswith("x-session-")
        ]
        record = {
            "at": round(time.time(), 3),
            "method": request.method,
            "path": request.path[:200],
            "status": response.status,
            "instructions": sent,
        }
        value = _encode(record)
        if len(value) > MAX_COOKIE:
            record["instructions"] = [(n, v[:100]) for n, v in sent][:10]
            value = _encode(record)
        _set(response, LAST_ACTION_COOKIE, value, 3600)
    return response
