"""At most one database read per legacy session, across every gateway process.

A legacy token is known by its SHA-256 (``legacy:sid:<digest>``; no live legacy cookie
in a Redis dump). The first process to see it claims that key (SET NX, "pending"),
reads the row and leaves the outcome there:

- ``none``: no live row (or a guest row when guests are not imported), for
  ``negative_ttl``; a junk cookie repeated costs no second query;
- ``{"at": …, "fields": …}``: imported, for ``imported_ttl``. Another process's request
  of the same legacy session within ``share_window`` (a page's parallel requests spread
  over workers) gets the same fields rather than a second read; later ones get nothing:
  the visitor has a gateway session, or had one and logged out;
- ``done``/``ended``: the gateway logged the visitor in itself, or their imported session
  ended; never read again.

Within a process, concurrent requests of one token share one lookup, and outcomes are
remembered in a bounded cache. Database reads are capped per second; after a failure
the database is left alone for ``retry_after`` seconds. Every path ends in an outcome
that the plugin counts; none raises.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

from gateway.errors import REDIS_FAILURES
from gateway.redis import Keys, RedisClient

from .config import LegacySessionsConfig
from .database import DATABASE_FAILURES, LegacyDatabase, Row, text_of

log = logging.getLogger("plugins.legacy_sessions")

Fields = dict[str, str]
Result = tuple[Fields | None, str]


def digest(token: str) -> str:
    # SECURITY: Redis names legacy sessions by SHA-256 only: a dump holds no live
    # legacy cookie (the rollback window's links aside, see legacy_sessions._link).
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


class _TokenBucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = max(1.0, rate)
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class LegacyReads:
    def __init__(
        self,
        config: LegacySessionsConfig,
        db: LegacyDatabase,
        redis: RedisClient,
        keys: Keys,
        redis_timeout: float,
        read_counted: Callable[[], None],
    ) -> None:
        self.config = config
        self.db = db
        self.redis = redis
        self.keys = keys
        self.redis_timeout = redis_timeout
        self.read_counted = read_counted
        # digest → (monotonic expiry, fields to share or None): outcomes known here.
        self._cache: OrderedDict[str, tuple[float, Fields | None]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Result]] = {}
        self._bucket = _TokenBucket(config.max_reads_per_second)
        self._down_until = 0.0
        self._warned_columns: set[str] = set()

    def key(self, h: str) -> str:
        return self.keys.named(f"legacy:sid:{h}")

    async def lookup(self, token: str) -> Result:
        """(fields of a live legacy session, or None; the outcome, for counting)."""
        h = digest(token)
        cached = self._cache.get(h)
        if cached is not None:
            if cached[0] > time.monotonic():
                return (dict(cached[1]), "shared") if cached[1] else (None, "cached")
            del self._cache[h]
        running = self._inflight.get(h)
        if running is not None:
            # Shielded: this request giving up must not cancel the others' lookup.
            fields, _ = await asyncio.shield(running)
            return (dict(fields) if fields else None), "joined"
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._inflight[h] = fut
        result: Result = (None, "cancelled")
        try:
            result = await self._lookup(h, token)
        finally:
            # Set even when this request was cancelled: the ones that joined go on.
            fut.set_result(result)
            del self._inflight[h]
        return result

    def forget(self, h: str) -> None:
        self._cache.pop(h, None)

    def _remember(self, h: str, seconds: float, fields: Fields | None = None) -> None:
        self._cache[h] = (time.monotonic() + seconds, fields)
        self._cache.move_to_end(h)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    async def _lookup(self, h: str, token: str) -> Result:
        key = self.key(h)
        claim = self.config.timeout + self.redis_timeout + 1
        try:
            async with asyncio.timeout(self.redis_timeout):
                claimed = await self.redis.set(key, "pending", nx=True, ex=int(claim) + 1)
                state = None if claimed else await self.redis.get(key)
            if not claimed and state == "pending":
                state = await self._wait_for_other(key)
        except REDIS_FAILURES as e:
            log.warning("legacy_sessions: redis failed: %s: %s", type(e).__name__, e)
            return None, "redis-error"
        if not claimed:
            return self._settled(h, state)
        result = await self._read(token)
        await self._settle(h, key, result)
        return result

    async def _wait_for_other(self, key: str) -> Any:
        """Another process is reading this session: its outcome, within the time its
        read may take."""
        deadline = time.monotonic() + self.config.timeout + self.redis_timeout
        state: Any = "pending"
        while state == "pending" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            async with asyncio.timeout(self.redis_timeout):
                state = await self.redis.get(key)
        return state

    def _settled(self, h: str, state: Any) -> Result:
        """The outcome another process (or an earlier request) left in Redis."""
        if state == "none":
            self._remember(h, self.config.negative_ttl)
            return None, "negative"
        if state in ("done", "ended"):
            self._remember(h, self.config.negative_ttl)
            return None, "already-imported"
        if not isinstance(state, str) or not state.startswith("{"):
            return None, "busy"  # still pending, or gone meanwhile: try again next request
        try:
            found = orjson.loads(state)
            left = float(found["at"]) + self.config.share_window - time.time()
            fields = {str(k): str(v) for k, v in dict(found["fields"]).items()}
        except (ValueError, KeyError, TypeError):
            return None, "busy"
        if left > 0:
            self._remember(h, left, fields)
            return fields, "shared"
        self._remember(h, self.config.negative_ttl)
        return None, "already-imported"

    async def _read(self, token: str) -> Result:
        cfg = self.config
        if time.monotonic() < self._down_until:
            return None, "db-down"
        if not self._bucket.take():
            return None, "throttled"
        values = {"token": token, "now": time.time()}
        args = [values[p] for p in cfg.query.params]
        self.read_counted()
        try:
            async with asyncio.timeout(cfg.timeout):
                row = await self.db.fetch_row(cfg.query.sql, args)
        except DATABASE_FAILURES as e:
            self._down_until = time.monotonic() + cfg.retry_after
            log.warning(
                "legacy_sessions: database read failed, source skipped for %gs: %s: %s",
                cfg.retry_after,
                type(e).__name__,
                e,
            )
            return None, "db-error"
        if row is None:
            return None, "not-found"
        fields = self._fields(row)
        if not fields.get("user_id") and not cfg.import_guests:
            return None, "guest"
        return fields, "imported"

    def _fields(self, row: Row) -> Fields:
        out: Fields = {}
        for name, column in self.config.fields.items():
            if column not in row:
                if column not in self._warned_columns:
                    self._warned_columns.add(column)
                    log.error("legacy_sessions: the query returns no column %r", column)
                continue
            value = row[column]
            if value is not None and value != "":
                out[name] = text_of(value)
        return out

    async def _settle(self, h: str, key: str, result: Result) -> None:
        """Leave the outcome for every process (or free the claim when there is none to
        leave: the database did not answer)."""
        fields, outcome = result
        try:
            async with asyncio.timeout(self.redis_timeout):
                if fields is not None:
                    value = orjson.dumps({"at": time.time(), "fields": fields})
                    await self.redis.set(key, value, ex=self.config.imported_ttl)
                elif outcome in ("not-found", "guest"):
                    await self.redis.set(key, "none", px=int(self.config.negative_ttl * 1000))
                else:
                    await self.redis.delete(key)
        except REDIS_FAILURES as e:
            log.warning("legacy_sessions: outcome not stored, redis failed: %s", e)
        if fields is not None:
            self._remember(h, self.config.share_window, fields)
        elif outcome in ("not-found", "guest"):
            self._remember(h, self.config.negative_ttl)

    async def mark(self, hs: list[str], state: str) -> None:
        """These legacy sessions are never to be imported (``done``: the gateway logged
        the visitor in; ``ended``: their gateway session ended)."""
        if not hs:
            return
        pipe = self.redis.pipeline(transaction=False)
        for h in hs:
            self.forget(h)
            pipe.set(self.key(h), state, ex=self.config.imported_ttl)
        async with asyncio.timeout(self.redis_timeout):
            await pipe.execute()
