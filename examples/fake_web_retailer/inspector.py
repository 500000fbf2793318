"""What the inspector page (``GET /inspector``) shows: the gateway at work, seen from the
shop, for a person with a browser and no terminal.

Everything but the Redis keys is what the shop itself knows: the ``X-Session-*``
headers of this request, what it answered its last action with (a cookie of its own,
flash.py), the page cache's report on the last product page (``X-Session-Page-Cache``,
page_cache's ``report`` option) and its database's session-write count. The keys are read
from Redis by the demo's view (``make_app(..., inspect_redis=URL)``): read-only, never
part of the shop's sessions, which stay the gateway's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("fake_web_retailer.inspector")

MAX_KEYS = 50  # keys listed at most
MAX_SCANNED = 10_000  # keys looked at per listing: a demo's Redis, never a production one
MAX_FIELDS = 16  # hash fields shown per key


@dataclass(frozen=True, slots=True)
class RedisKey:
    name: str
    type: str
    ttl: int  # seconds; -1 none
    fields: tuple[tuple[str, str], ...] = ()
    more: int = 0  # fields not shown


@dataclass(slots=True)
class RedisView:
    available: bool
    keys: list[RedisKey] = field(default_factory=list)
    error: str | None = None


def parse_params(value: str | None) -> dict[str, str]:
    """``k=v;k=v`` (as the gateway's own report headers) into a dict, values decoded."""
    out: dict[str, str] = {}
    for part in (value or "").split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k:
            out[k] = unquote(v)
    return out


def ago(epoch: str | float | None, now: float | None = None) -> str:
    """"12 s ago", "3 min ago", "2 h 5 min ago"; "" for something that is not a time."""
    try:
        t = float(epoch) if epoch is not None else None
    except ValueError:
        return ""
    if t is None or t <= 0:
        return ""
    seconds = max(0, int((now if now is not None else time.time()) - t))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60} min ago" if rest >= 60 else f"{hours} h ago"


def clock(epoch: str | float | None) -> str:
    try:
        return time.strftime("%H:%M:%S UTC", time.gmtime(float(epoch or "")))
    except ValueError:
        return ""


class RedisLens:
    """The session's keys as they are in Redis, for the inspector only."""

    def __init__(self, url: str) -> None:
        self.client: aioredis.Redis = aioredis.from_url(
            url, decode_responses=True, socket_timeout=1.0, socket_connect_timeout=1.0
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def keys_of(self, session_id: str | None, user_id: str | None) -> RedisView:
        """Keys named after the session's id (``session:<id>``, ``cart:<id>``, …) or its
        user's (``user_cart:<user_id>``, ``user_sessions:<user_id>``)."""
        patterns = []
        if session_id and all(c in "0123456789abcdef" for c in session_id):
            patterns.append(f"*{session_id}*")
        if user_id and user_id.isalnum():
            patterns += [f"*:{user_id}", f"*{{u:{user_id}}}*"]
        view = RedisView(available=True)
        try:
            names: set[str] = set()
            for pattern in patterns:
                scanned = 0
                async for name in self.client.scan_iter(match=pattern, count=1000):
                    names.add(str(name))
                    scanned += 1
                    if scanned >= MAX_SCANNED or len(names) >= MAX_KEYS:
                        break
            for name in sorted(names)[:MAX_KEYS]:
                view.keys.append(await self._describe(name))
        except (RedisError, OSError, TimeoutError) as e:
            view.error = f"{type(e).__name__}: {e}"
            log.warning("inspector: redis read failed: %s", view.error)
        return view

    async def _describe(self, name: str) -> RedisKey:
        kind = str(await self.client.type(name))
        ttl = int(await self.client.ttl(name))
        pairs: list[tuple[str, str]] = []
        size = 0
        if kind == "hash":
            data: dict[str, Any] = await self.client.hgetall(name)
            pairs = sorted((str(k), str(v)) for k, v in data.items())
            size = len(pairs)
        elif kind == "set":
            members = sorted(str(m) for m in await self.client.smembers(name))
            pairs = [(m[:16] + "…" if len(m) > 16 else m, "") for m in members]
            size = len(pairs)
        elif kind == "zset":
            top = await self.client.zrevrange(name, 0, MAX_FIELDS - 1, withscores=True)
            pairs = [(str(m), f"{s:.0f}" if s == int(s) else f"{s:.3f}") for m, s in top]
            size = int(await self.client.zcard(name))
        elif kind == "string":
            pairs = [("", str(await self.client.get(name))[:200])]
            size = 1
        return RedisKey(name, kind, ttl, tuple(pairs[:MAX_FIELDS]), max(0, size - MAX_FIELDS))
