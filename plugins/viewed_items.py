"""Recently viewed items per visitor, and a global popularity ranking.

For a GET of a page matching ``pattern`` that answered 200, the item is recorded in
``viewed:<id>`` (ZSET item -> time; the last ``keep`` items) and counted in the ranking
ZSET (``ranking_key``, item -> views). Both are written behind: the response hook only
touches an in-process buffer, and a background task flushes it every ``flush_interval``
in one pipeline. The buffer is bounded (``max_pending``); past that, views are dropped and
counted rather than growing memory. A failed flush is dropped too (at-most-once): views
are statistics, and retrying a ZINCRBY that may have been applied would double-count.

Only 200 answers count, and the ranking is trimmed to ``ranking_size`` members, so
requests for made-up item names cannot grow it without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import cast
from urllib.parse import quote

from aiohttp import web
from prometheus_client import Counter
from pydantic import Field, field_validator

from gateway.errors import REDIS_FAILURES
from gateway.paths import item_of, item_pattern
from gateway.plugin import Commands, Plugin, PluginConfig, RequestContext, ResponseHead
from gateway.sessions import Session

log = logging.getLogger("plugins.viewed_items")

VIEWS = Counter("gateway_viewed_items_total", "Item views by outcome", ["outcome"])


class ViewedItemsConfig(PluginConfig):
    pattern: str = "/products/{item}"
    keep: int = Field(25, ge=1, le=1000)
    ranking_key: str = Field("viewed:ranking", min_length=1)
    ranking_size: int = Field(10_000, ge=1, description="members kept in the ranking")
    ttl: int = Field(7 * 86400, gt=0, description="seconds a visitor's list lives")
    header: bool = False
    flush_interval: float = Field(0.2, gt=0, le=10)
    max_pending: int = Field(10_000, gt=0, description="visitors and items buffered at most")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        item_pattern(v)
        return v


class ViewedItems(Plugin):
    name = "viewed_items"
    Config = ViewedItemsConfig
    fault_policy = "open"

    config: ViewedItemsConfig

    async def startup(self) -> None:
        self._re = item_pattern(self.config.pattern)
        self._ranking = self.services.keys.named(self.config.ranking_key)
        # viewed key -> item -> time, oldest first; item -> views
        self._views: dict[str, dict[str, float]] = {}
        self._counts: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="viewed-items-writer")

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.flush()

    # -- request side -------------------------------------------------------------------

    def prefetch(self, ctx: RequestContext, key_id: str) -> Commands:
        # The list rides along with the session lookup: no round trip of its own.
        if not self.config.header:
            return ()
        key = self.services.keys.of("viewed", key_id)
        return (("ZREVRANGE", key, "0", str(self.config.keep - 1)),)

    async def request(self, ctx: RequestContext) -> web.StreamResponse | None:
        s = ctx.session
        if not self.config.header or s is None or not ctx.redis_ok:
            return None
        items: list[str] = []
        # Nothing prefetched: no lookup was made for this request (a session adopted from
        # a plugin source has no views yet).
        pre = ctx.prefetched.get(self.name)
        if pre:
            if isinstance(pre[0], Exception):
                log.warning("viewed items read failed: %s", pre[0])
                return None
            items = cast(list[str], pre[0])
        # Views still in the buffer are newer than anything in Redis.
        pending = list(self._views.get(self.services.keys.of("viewed", s.key_id), {}))[::-1]
        merged = list(dict.fromkeys(pending + items))[: self.config.keep]
        ctx.session_headers["X-Session-Viewed"] = ",".join(quote(i, safe="") for i in merged)
        return None

    async def response(self, ctx: RequestContext, head: ResponseHead) -> None:
        if ctx.request.method != "GET" or head.status != 200:
            return
        item = item_of(self._re, ctx.path)
        if item is None:
            return
        s = ctx.session
        self.record(self.services.keys.of("viewed", s.key_id) if s is not None else None, item)

    def record(self, key: str | None, item: str) -> None:
        now = time.time()
        if key is not None:
            seen = self._views.get(key)
            if seen is None and len(self._views) >= self.config.max_pending:
                VIEWS.labels("dropped").inc()
            else:
                if seen is None:
                    seen = self._views[key] = {}
                seen.pop(item, None)
                seen[item] = now
                if len(seen) > self.config.keep:
                    seen.pop(next(iter(seen)))
        if item in self._counts or len(self._counts) < self.config.max_pending:
            self._counts[item] = self._counts.get(item, 0) + 1
            VIEWS.labels("recorded").inc()
        else:
            VIEWS.labels("dropped").inc()

    # -- moving with the session ----------------------------------------------------------

    async def session_rotated(self, old: Session | None, new: Session) -> None:
        if old is None or (old.authenticated and old.user_id != new.user_id):
            return
        keys = self.services.keys
        src, dst = keys.of("viewed", old.key_id), keys.of("viewed", new.key_id)
        buffered = self._views.pop(src, None)
        if buffered:
            self._views.setdefault(dst, {}).update(buffered)
        async with asyncio.timeout(self.services.redis_timeout):
            if self.services.cluster:
                await self._move_in_steps(src, dst)
                return
            async with self.services.redis.pipeline(transaction=True) as pipe:
                pipe.zunionstore(dst, [dst, src], aggregate="MAX")
                pipe.delete(src)
                pipe.zremrangebyrank(dst, 0, -(self.config.keep + 1))
                pipe.expire(dst, self.config.ttl)
                await pipe.execute()

    async def _move_in_steps(self, src: str, dst: str) -> None:
        """The move in a cluster, where the two lists are in two slots: read the old one,
        add it to the new one keeping the later view of each item (ZADD GT, as the
        union's MAX), then delete the old one. Stopped after the add, the old list stays
        under a session that is gone until its ttl: the new one lacks nothing."""
        redis = self.services.redis
        seen = cast(list[tuple[str, float]], await redis.zrange(src, 0, -1, withscores=True))
        if not seen:
            return
        async with redis.pipeline(transaction=True) as pipe:
            pipe.zadd(dst, dict(seen), gt=True)
            pipe.zremrangebyrank(dst, 0, -(self.config.keep + 1))
            pipe.expire(dst, self.config.ttl)
            await pipe.execute()
        await redis.delete(src)

    async def sessions_deleted(self, key_ids: list[str]) -> None:
        # In a cluster redis-py's DEL of several keys goes slot by slot.
        keys = [self.services.keys.of("viewed", k) for k in key_ids]
        for k in keys:
            self._views.pop(k, None)
        if keys:
            async with asyncio.timeout(self.services.redis_timeout):
                await self.services.redis.delete(*keys)

    # -- background side ------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.flush_interval)
            await self.flush()

    async def flush(self) -> None:
        if not self._views and not self._counts:
            return
        views, self._views = self._views, {}
        counts, self._counts = self._counts, {}
        keep, ttl = self.config.keep, self.config.ttl
        try:
            # One round trip for the batch; a big batch after a busy second gets more time.
            async with asyncio.timeout(1.0 + (len(views) + len(counts)) / 2000):
                async with self.services.redis.pipeline(transaction=False) as pipe:
                    for key, seen in views.items():
                        pipe.zadd(key, seen)
                        pipe.zremrangebyrank(key, 0, -(keep + 1))
                        pipe.expire(key, ttl)
                    for item, n in counts.items():
                        pipe.zincrby(self._ranking, n, item)
                    if counts:
                        pipe.zremrangebyrank(self._ranking, 0, -(self.config.ranking_size + 1))
                    await pipe.execute()
        except REDIS_FAILURES as e:
            VIEWS.labels("lost").inc(sum(counts.values()))
            log.warning("viewed items flush failed: %s: %s", type(e).__name__, e)
        except Exception:
            # Data the client refused to encode (a bug, not an outage): the batch is
            # dropped so the writer keeps running for everyone else.
            VIEWS.labels("lost").inc(sum(counts.values()))
            log.exception("viewed items flush failed; batch dropped")

