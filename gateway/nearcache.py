"""A near-cache of session hashes, kept coherent by Redis itself.

Every proxied request needs its session; most sessions are read again and again within
seconds. Serving them from this process's memory saves the HGETALL round trip, which the
benchmark profile showed to be the biggest cost sessions add to a request.

Coherence comes from Redis's server-assisted client-side caching (CLIENT TRACKING, Redis
6+), in broadcast mode: one dedicated RESP3 connection (the *link*) asks Redis to push an
``invalidate`` message for every change to a key under ``<key_prefix>session:``, made by
anyone — another gateway process, a login or logout here, an operator's HSET, an expiry,
an eviction, a FLUSHDB. The link is also the connection this process's write-behind
activity goes through, with NOLOOP: the link's own writes don't invalidate. Those writes
only touch last_activity, current_page and page_views, which ``touch`` applies to the
cached copy as each request is recorded, so the copy stays what Redis will hold.

Rules that keep it correct:
- The cache is used only while the link is up and tracking. When the link breaks (Redis
  restarted, connection killed, a heartbeat unanswered within redis.timeout) the cache is
  emptied at once and stays off until tracking is on again; requests then read Redis.
- A read that was in flight when its key was invalidated, or that started before tracking
  was (re)enabled, is not stored: it may predate the change.
- Entries are also dropped after ``max_age`` seconds (each after a random 50-100 % of
  it), as a bound should an invalidation ever be lost, and the least recently used go
  first beyond ``max_entries``. A session in use does not wait for that: once its copy
  is past half of ``max_age``, the next activity flush (activity.py) brings its whole
  hash back from Redis, read in the same script that wrote the activity, and the copy
  is renewed from it, under the same rule as any read.

Staleness is bounded by how fast an invalidation travels from Redis to this process
(well under a millisecond on a LAN); a session changed through this process (login,
logout, X-Session-Set) is dropped from the cache before the response is sent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import time
from typing import Any, cast

import hiredis
from redis._parsers.base import AsyncPushNotificationsParser
from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from . import metrics
from .config import NearCacheSettings
from .errors import REDIS_FAILURES

log = logging.getLogger("gateway.nearcache")

# Seconds of silence on the link before it is probed with a PING (an unanswered probe
# breaks the link): at most this, or redis.timeout if shorter.
HEARTBEAT = 1.0
_HITS = metrics.NEAR_CACHE.labels("hit")
_MISSES = metrics.NEAR_CACHE.labels("miss")


class NearCache:
    def __init__(self, settings: NearCacheSettings) -> None:
        self.max_entries = settings.max_entries
        self.max_age = settings.max_age
        self.enabled = False
        self._entries: collections.OrderedDict[str, tuple[dict[str, str], float]] = (
            collections.OrderedDict()
        )
        # Bumped on every enable/disable: a read begun under another epoch is not stored.
        self._epoch = 0
        self._seq = 0  # invalidations seen
        self._inflight: dict[str, int] = {}
        self._invalidated: dict[str, int] = {}  # in-flight key -> seq of its invalidation

    def get(self, key: str) -> dict[str, str] | None:
        """A copy of the cached hash, or None."""
        if not self.enabled:
            return None
        entry = self._entries.get(key)
        if entry is None:
            _MISSES.inc()
            return None
        fields, stored = entry
        if time.monotonic() - stored > self.max_age:
            del self._entries[key]
            _MISSES.inc()
            return None
        self._entries.move_to_end(key)
        _HITS.inc()
        return dict(fields)

    def begin(self, key: str) -> tuple[int, int]:
        """Before reading ``key`` from Redis; pass the result to ``end``."""
        self._inflight[key] = self._inflight.get(key, 0) + 1
        return self._epoch, self._seq

    def end(
        self,
        key: str,
        began: tuple[int, int],
        fields: dict[str, str] | None,
        *,
        spread: bool = True,
    ) -> bool:
        """After the read: store ``fields`` unless the key changed meanwhile; True when
        stored.
        ``spread=False`` for a renewal: its full ``max_age`` starts now (renewals come
        in flush batches, not in bursts of reads that would expire together)."""
        n = self._inflight[key] - 1
        invalidated = self._invalidated.get(key, -1)
        if n:
            self._inflight[key] = n
        else:
            del self._inflight[key]
            self._invalidated.pop(key, None)
        epoch, seq = began
        if not self.enabled or epoch != self._epoch or invalidated >= seq or not fields:
            return False
        # Backdated by up to half of max_age: entries read together (a cold start, a
        # burst) then expire spread out instead of all at once, which would send every
        # one of them to Redis in the same second (measured: p99 62 ms at 1,000 req/s).
        stored = time.monotonic() - (random.random() * self.max_age / 2 if spread else 0.0)
        self._entries[key] = (dict(fields), stored)
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def touch(self, key: str, now: float, page: str) -> None:
        """Mirror one recorded request's activity (what the flush will write)."""
        entry = self._entries.get(key)
        if entry is not None and not mirror(entry[0], now, page, 1):
            del self._entries[key]

    def wants_refresh(self, key: str) -> bool:
        """Whether the activity flush should bring ``key``'s hash back for this cache:
        its copy is past half of ``max_age``. A session in use is then renewed by its
        own flushes before it expires, instead of costing a read. A key without a copy
        is not filled this way: with more sessions in use than ``max_entries`` most such
        fills would be evicted unread."""
        if not self.enabled:
            return False
        entry = self._entries.get(key)
        return entry is not None and time.monotonic() - entry[1] > self.max_age / 2

    def invalidate(self, keys: list[str] | None) -> None:
        """Forget ``keys`` (None: everything, as after FLUSHDB)."""
        self._seq += 1
        if keys is None:
            self._entries.clear()
            for k in self._inflight:
                self._invalidated[k] = self._seq
            return
        for k in keys:
            self._entries.pop(k, None)
            if k in self._inflight:
                self._invalidated[k] = self._seq

    def enable(self) -> None:
        self._entries.clear()
        self._epoch += 1
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False
        self._epoch += 1
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def ts(t: float) -> str:
    """Epoch seconds as stored in session hashes: with milliseconds."""
    return f"{t:.3f}"


def mirror(fields: dict[str, str], last_activity: float, page: str, views: int) -> bool:
    """Apply recorded activity to a copy of a session hash the way the activity script
    will apply it in Redis; False when the copy's page_views is not a number."""
    try:
        fields["page_views"] = str(int(fields.get("page_views", "0")) + views)
    except ValueError:
        return False
    fields["last_activity"] = ts(last_activity)
    fields["current_page"] = page
    return True


_PING = hiredis.pack_command(("PING",))
_WINDOW_END = object()
_PROBE = object()


class LinkDown(ConnectionError):
    """The tracking link is not up; the caller uses the ordinary pool instead."""


class TrackingLink:
    """The dedicated connection: tracking on, invalidations in, activity writes out.

    One reader task owns every read on it: replies are matched to callers in order,
    ``invalidate`` pushes go to the cache as they arrive.
    """

    def __init__(
        self, url: str, prefix: str, cache: NearCache, timeout: float, connect_timeout: float
    ) -> None:
        self.prefix = prefix
        self.cache = cache
        self.timeout = timeout
        # The pool only builds the connection (URL parsing, TLS, unix sockets, AUTH,
        # SELECT); it never hands it out.
        self._pool = ConnectionPool.from_url(
            url,
            protocol=3,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,
        )
        self._conn: AbstractConnection | None = None
        # Callers waiting for replies, in send order, each with what its reply starts or
        # ends: a window of our own writes (see call_own_write).
        self._pending: collections.deque[tuple[asyncio.Future[Any], Any]] = collections.deque()
        self._own: frozenset[str] = frozenset()
        self._task: asyncio.Task[None] | None = None
        self._up = False  # tracking confirmed on the current connection
        self._stopping = False
        self._heartbeat = min(HEARTBEAT, timeout)
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def up(self) -> bool:
        return self._up

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="near-cache-link")

    async def call(self, *args: Any) -> Any:
        """Run one command on the link (raises LinkDown when it is not up)."""
        return await self._send(args, None)

    async def call_own_write(self, keys: frozenset[str], *args: Any) -> Any:
        """Run a script that writes ``keys`` on this process's behalf, so that the
        invalidations it causes don't evict them from our cache.

        NOLOOP alone is not enough: Redis 7.0 attributes a script's writes to its Lua
        client, so they are pushed to us too, after the script's reply and before the
        reply to any command we send once that reply is in. So pushes for ``keys`` are
        ignored from the script's reply until the reply to a PING sent on receiving it;
        where Redis honours NOLOOP for scripts there are none to ignore. The script
        reports the keys it found gone, which the caller invalidates itself.

        The price: another client's change to one of ``keys`` landing in that window
        (one round trip) is missed too, until the copy is renewed by a later flush of
        that session (which reads the hash after the change) or ``max_age`` ends it.
        """
        return await self._send(args, keys)

    async def _send(self, args: tuple[Any, ...], tag: Any) -> Any:
        conn = self._conn
        if conn is None or not self.up:
            raise LinkDown("tracking link is down")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Appended before the bytes go out: replies come back in send order, and
        # send_packed_command writes synchronously before its first await.
        self._pending.append((fut, tag))
        try:
            # hiredis's packer: the same bytes as redis-py's, eight times faster for an
            # activity script call's few hundred arguments (measured 9 vs 77 µs).
            await conn.send_packed_command(hiredis.pack_command(args), check_health=False)
        except BaseException as e:
            fut.cancel()  # nobody will await it
            self._broken("send failed")
            if isinstance(e, Exception):
                # Like any other loss of the link: the caller falls back to the pool.
                raise LinkDown(f"tracking link send failed: {e}") from e
            raise
        try:
            async with asyncio.timeout(self.timeout):
                return await fut
        except TimeoutError:
            # An unanswered link is a broken link: off with the cache, and the caller
            # (activity) falls back to the pool; its batch id makes a re-send safe.
            self._broken("call unanswered")
            raise LinkDown("tracking link did not answer in time") from None

    async def _run(self) -> None:
        delay = 0.1
        while not self._stopping:
            try:
                await self._session()
                delay = 0.1
            except asyncio.CancelledError:
                raise
            except ResponseError as e:
                # Redis < 6 (no CLIENT TRACKING), or RESP3 refused: no near-cache.
                log.warning("near-cache off: Redis refused tracking (%s)", e)
                self._broken(str(e))
                return
            except REDIS_FAILURES as e:
                if self.up or delay == 0.1:
                    log.warning("near-cache link lost (%s: %s); cache off", type(e).__name__, e)
                self._broken(str(e))
            except Exception as e:
                # Whatever it was, the cache must not stay on without its link.
                log.exception("near-cache link failed; cache off")
                self._broken(f"{type(e).__name__}: {e}")
            if self._stopping:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _session(self) -> None:
        conn: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        self._conn = conn
        await conn.connect()  # type: ignore[no-untyped-call]
        parser = cast(AsyncPushNotificationsParser, conn._parser)
        parser.set_invalidation_push_handler(self._on_invalidate)  # type: ignore[no-untyped-call]
        await conn.send_command(
            "CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", self.prefix, "NOLOOP"
        )
        # No explicit timeout: redis-py then raises on socket_timeout (with one, it would
        # return None and the cache would go on without tracking being confirmed).
        reply = await conn.read_response()
        if reply != "OK":
            raise ConnectionError(f"CLIENT TRACKING answered {reply!r}")
        self.cache.enable()
        self._up = True
        log.info("near-cache on (tracking %s*)", self.prefix)
        probing: asyncio.Future[Any] | None = None
        while not self._stopping:
            error: ResponseError | None = None
            silent = False
            try:
                # Our own timer, so that a nil reply is never mistaken for silence.
                async with asyncio.timeout(self._heartbeat):
                    reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
            except TimeoutError:
                silent = True
            except ResponseError as e:
                reply, error = None, e
            if silent:
                if probing is not None:
                    raise TimeoutError("heartbeat unanswered")
                probing = asyncio.get_running_loop().create_future()
                self._pending.append((probing, _PROBE))
                await conn.send_packed_command(_PING, check_health=False)
                continue
            if not self._pending:
                raise ConnectionError("a reply nobody asked for: replies and callers out of step")
            fut, tag = self._pending.popleft()
            if tag is _WINDOW_END:
                self._own = frozenset()
            elif tag is not None and tag is not _PROBE:
                self._own = tag
                end: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                self._pending.append((end, _WINDOW_END))
                await conn.send_packed_command(_PING, check_health=False)
            if fut is probing:
                probing = None
            if fut.done():
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(reply)

    async def _on_invalidate(self, message: list[Any]) -> None:
        keys = message[1] if len(message) > 1 else None
        if keys is not None and self._own:
            keys = [k for k in keys if k not in self._own]
            if not keys:
                return
        self.cache.invalidate(list(keys) if keys is not None else None)
        metrics.NEAR_CACHE_INVALIDATIONS.inc(len(keys) if keys is not None else 1)

    def _broken(self, why: str) -> None:
        self.cache.disable()
        self._up = False
        conn, self._conn = self._conn, None
        self._own = frozenset()
        while self._pending:
            fut, tag = self._pending.popleft()
            if fut.done():
                continue
            if tag is _WINDOW_END or tag is _PROBE:
                fut.cancel()  # nobody awaits these
            else:
                fut.set_exception(LinkDown(f"tracking link lost: {why}"))
        if conn is not None:
            task = asyncio.get_running_loop().create_task(conn.disconnect(nowait=True))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._broken("stopped")
        if self._closing:
            await asyncio.wait(self._closing, timeout=1.0)
