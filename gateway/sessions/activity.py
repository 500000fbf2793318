"""Write-behind activity: last_activity, current_page, page_views and the sliding TTL.

Requests never wait for Redis here. ``record`` is synchronous and only touches a dict that
coalesces per session; a background task flushes it every ``flush_interval`` as one
script call per batch, so N requests of M sessions cost ceil(M/BATCH) commands, not 4N.

Through the near-cache's link, each script call also brings back the hashes of the
sessions whose cached copy is past half its age, so a session in use is kept
in the near-cache by its own flushes rather than read again when its copy expires.

No page view is counted twice: each batch carries a random id that the script claims with
SET NX before applying anything, and a batch that failed is retried with the *same* id and
content. If the failure was a timeout after Redis had applied it, the retry is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Container
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from redis.exceptions import NoScriptError

from .. import metrics
from ..config import ActivitySettings
from ..errors import REDIS_FAILURES
from ..redis import Keys, RedisClient
from ..redis.cluster import slot_of
from ..redis.durable import NotReplicated, Writes
from ..redis.scripts import Execute, Script
from ..redis.tracking import LinkDown, TrackingLink
from .model import apply_activity, ts
from .nearcache import NearCache

log = logging.getLogger("gateway.activity")
_SECONDS = metrics.REDIS_SECONDS.labels("activity")

# Sessions per script call: one call blocks Redis (and the reads queued behind it) for
# its whole run, so a backlog goes out as several short calls, not one long one.
BATCH = 200

# KEYS[1] = batch marker, KEYS[2..] = session hashes
# ARGV = idle_ttl, now, JSON array with one [last_activity, page, views, deadline,
# refresh] per session. One JSON argument instead of five per session: packing thousands
# of small arguments costs the gateway more than Redis needs to decode them.
# Only an existing hash is touched: activity must never resurrect a logged-out session.
# Returns -1 for a repeated batch, else one reply per session: 0 = gone (or removed at
# its deadline), 1 = updated, or (refresh = 1) the whole updated hash as field, value...
# for the near-cache. HRANDFIELD with a count above the hash's size returns every field,
# like HGETALL; the gateway never sends it at top level, so in INFO commandstats HGETALL
# still counts the gateway's own session reads and nothing else.
_SCRIPT = Script(
    """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', 300) == false then return -1 end
local idle = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local data = cjson.decode(ARGV[3])
local out = {}
for i = 2, #KEYS do
  local k, e = KEYS[i], data[i - 1]
  local ttl = math.min(idle, math.floor(e[4] - now))
  -- EXPIRE doubles as the existence check (0 for a missing key): three commands per
  -- session, and a key past its absolute deadline is removed by a non-positive TTL.
  if redis.call('EXPIRE', k, ttl) == 1 and ttl > 0 then
    -- An empty page: touches only (no page view since the last flush).
    if e[2] == '' then
      redis.call('HSET', k, 'last_activity', e[1])
    else
      redis.call('HSET', k, 'last_activity', e[1], 'current_page', e[2])
      redis.call('HINCRBY', k, 'page_views', e[3])
    end
    if e[5] == 1 then
      local h = redis.pcall('HRANDFIELD', k, 1073741824, 'WITHVALUES')
      -- Redis < 6.2 has no HRANDFIELD: an error here would abort the script half done.
      if h.err then h = redis.call('HGETALL', k) end
      out[i - 1] = h
    else
      out[i - 1] = 1
    end
  else
    out[i - 1] = 0
  end
end
return out
""",
    op="activity",
)


@dataclass(slots=True)
class Pending:
    last_activity: float
    page: str
    views: int
    deadline: float


@dataclass(slots=True)
class Batch:
    id: str
    entries: dict[str, Pending]
    # Sent at least once: until it is acknowledged, Redis may or may not hold it.
    sent: bool = False


class ActivityWriter:
    def __init__(
        self,
        redis: RedisClient,
        settings: ActivitySettings,
        idle_ttl: int,
        keys: Keys | None = None,
        link: TrackingLink | None = None,
        cache: NearCache | None = None,
        writes: Writes | None = None,
    ) -> None:
        """``link`` and ``cache``: the near-cache's tracking link (writes made there don't
        invalidate this process's cached sessions: NOLOOP) and the cache whose copies
        each recorded request updates and each flush may renew. ``writes``: a cluster's
        flush goes per slot, and with redis.wait a batch counts as written only once
        the replicas have it (durable.py)."""
        self.redis = redis
        self.writes = writes or Writes(redis)
        self.settings = settings
        self.idle_ttl = idle_ttl
        self.keys = keys or Keys()
        self._pending: dict[str, Pending] = {}
        self._retry: list[Batch] = []
        # Sessions in self._retry's batches, kept as they change: pending_count() runs for
        # every new session recorded, and summing the batches there cost O(batches) per
        # request during an outage, when they pile up.
        self._retry_total = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._backoff_reset = False
        self._stopping = False
        self.link = link
        self.cache = cache

    # -- request side (synchronous, never blocks) --------------------------------------

    def record(self, key: str, page: str, deadline: float) -> None:
        """A page view of ``page``."""
        self._add(key, page, 1, deadline)

    def touch(self, key: str, deadline: float) -> None:
        """Activity without a page view: last_activity and the idle TTL only."""
        self._add(key, "", 0, deadline)

    def _add(self, key: str, page: str, views: int, deadline: float) -> None:
        now = time.time()
        if self.cache is not None:
            # The near-cache's copy says at once what the flush will write.
            self.cache.update(key, apply_activity, now, page, views)
        p = self._pending.get(key)
        if p is not None:
            p.last_activity = now
            if page:
                p.page = page
            p.views += views
            return
        if self.pending_count() >= self.settings.max_pending:
            self._drop_oldest()
        self._pending[key] = Pending(now, page, views, deadline)

    def apply_unflushed(
        self, key: str, fields: dict[str, str], skip: Batch | None = None
    ) -> bool:
        """Mirror onto ``fields`` (a hash of session ``key`` read from Redis) this
        process's activity for it that Redis does not hold yet, oldest first, as the
        flush will apply it. False when that cannot be told (a batch holding it was
        sent: it is on its way, or timed out and may have been applied) or the hash's
        page_views is not a number. ``skip``: a batch known to be in ``fields``."""
        waiting: list[Pending] = []
        for b in self._retry:
            p = b.entries.get(key)
            if p is not None and b is not skip:
                if b.sent:
                    return False
                waiting.append(p)
        p = self._pending.get(key)
        if p is not None:
            waiting.append(p)
        return all(apply_activity(fields, w.last_activity, w.page, w.views) for w in waiting)

    def pending_count(self) -> int:
        return len(self._pending) + self._retry_total

    def _drop_oldest(self) -> None:
        # Oldest first: a batch waiting for retry is older than anything in _pending.
        if self._retry:
            batch = self._retry[0]
            batch.entries.pop(next(iter(batch.entries)))
            self._retry_total -= 1
            if not batch.entries:
                self._retry.pop(0)
        elif self._pending:
            self._pending.pop(next(iter(self._pending)))
        metrics.ACTIVITY_DROPPED.inc()

    def discard(self, key: str) -> None:
        """Forget buffered activity of a session that is being deleted or replaced. A
        flush already on the wire cannot recreate it either: the script only touches
        keys that still exist."""
        self._pending.pop(key, None)
        for b in self._retry:
            # Safe either way: if that batch was applied, the retry is skipped by its id.
            if b.entries.pop(key, None) is not None:
                self._retry_total -= 1

    # -- background side ------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="activity-writer")

    def retry_now(self, *_: object) -> None:
        """Redis is back (the Sentinels named a new master): flush at once rather than
        at the end of the backoff."""
        self._backoff_reset = True
        self._wake.set()

    async def _run(self) -> None:
        backoff = self.settings.flush_interval
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
            self._wake.clear()
            if self._backoff_reset:
                self._backoff_reset = False
                backoff = self.settings.flush_interval
            await self.flush()
            # Back off only while batches wait for a retry (Redis failed). Activity that
            # arrived during the flush is no failure: under steady traffic there always
            # is some, and treating it as one stretched the interval to max_backoff.
            backoff = (
                min(backoff * 2, self.settings.max_backoff)
                if self._retry
                else self.settings.flush_interval
            )

    async def flush(self) -> bool:
        """Send everything buffered; True when nothing is left over."""
        if self._pending:
            fresh, self._pending = self._pending, {}
            for group in self._groups(list(fresh.items())):
                for i in range(0, len(group), BATCH):
                    self._retry.append(Batch(secrets.token_hex(8), dict(group[i : i + BATCH])))
            self._retry_total += len(fresh)
        self._retry = [b for b in self._retry if b.entries]
        if not self._retry:
            metrics.ACTIVITY_PENDING.set(0)
            return True
        if self.writes.cluster:
            return await self._flush_cluster()
        # Oldest first, one call each: a batch leaves the retry list only once Redis has
        # applied it, so a failure part-way keeps exactly the batches not yet sent.
        while self._retry:
            batch = self._retry[0]
            batch.sent = True
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.settings.flush_timeout):
                    await self._send(batch)
            except REDIS_FAILURES as e:
                metrics.ACTIVITY_FLUSHES.labels("error").inc()
                metrics.REDIS_ERRORS.labels("activity").inc()
                log.warning(
                    "activity flush failed (%s: %s); %d sessions kept for retry",
                    type(e).__name__,
                    e,
                    self.pending_count(),
                )
                return False
            except Exception:
                # Not an outage but data the client or Redis refused (a bug): retrying
                # would fail forever and block every later flush, so the batch goes.
                log.exception("activity flush failed; dropping %d sessions", len(batch.entries))
                metrics.ACTIVITY_DROPPED.inc(len(batch.entries))
            finally:
                _SECONDS.observe(time.perf_counter() - started)
                metrics.ACTIVITY_PENDING.set(self.pending_count())
            if self._retry and self._retry[0] is batch:
                self._retry.pop(0)
                self._retry_total -= len(batch.entries)
        metrics.ACTIVITY_FLUSHES.labels("ok").inc()
        return not self._pending

    def _groups(self, items: list[tuple[str, Pending]]) -> list[list[tuple[str, Pending]]]:
        """The sessions of a flush in groups a script call may take: all of them on one
        node; one group per slot in a cluster (a script's keys share a slot)."""
        if not self.writes.cluster:
            return [items]
        by_slot: dict[int, list[tuple[str, Pending]]] = {}
        for item in items:
            by_slot.setdefault(slot_of(item[0]), []).append(item)
        return list(by_slot.values())

    async def _flush_cluster(self) -> bool:
        """Every waiting batch at once, each a script call on its slot's master: one
        round trip per node, the nodes concurrently. Batches of one slot go to one node
        on one connection in order, so a session's older activity is never written after
        its newer. A batch leaves the retry list only once written (with redis.wait, once
        the replicas have it); those of a node that failed wait for the next flush."""
        batches = list(self._retry)
        for b in batches:
            b.sent = True
        encoded = [self._encode(b, ()) for b in batches]
        try:
            async with asyncio.timeout(self.settings.flush_timeout):
                results = await self._spread_scripts(encoded)
        except REDIS_FAILURES as e:
            results = [e] * len(batches)
        failed = [r for r in results if isinstance(r, Exception)]
        done = {
            id(b) for b, r in zip(batches, results, strict=True) if not isinstance(r, Exception)
        }
        self._retry = [b for b in self._retry if id(b) not in done]
        self._retry_total = sum(len(b.entries) for b in self._retry)
        metrics.ACTIVITY_PENDING.set(self.pending_count())
        if failed:
            metrics.ACTIVITY_FLUSHES.labels("error").inc()
            metrics.REDIS_ERRORS.labels("activity").inc()
            log.warning(
                "activity flush failed for %d of %d slots (%s: %s); %d sessions kept for retry",
                len(failed),
                len(batches),
                type(failed[0]).__name__,
                failed[0],
                self.pending_count(),
            )
            return False
        metrics.ACTIVITY_FLUSHES.labels("ok").inc()
        return not self._pending

    async def _spread_scripts(self, encoded: list[tuple[list[str], list[Any]]]) -> list[Any]:
        def calls(which: list[int]) -> list[tuple[Any, ...]]:
            out = []
            for i in which:
                keys, args = encoded[i]
                out.append(("EVALSHA", _SCRIPT.sha, len(keys), *keys, *args))
            return out

        todo = list(range(len(encoded)))
        metrics.REDIS_COMMANDS.labels("activity").inc(len(todo))
        results = await self.writes.spread(calls(todo))
        missing = [i for i, r in zip(todo, results, strict=True) if isinstance(r, NoScriptError)]
        if missing:
            # A master that never saw the script (a promoted replica sees it through
            # replication, a new or restarted one does not): loaded on every master.
            await self.redis.script_load(_SCRIPT.source)
            again = await self.writes.spread(calls(missing))
            for i, r in zip(missing, again, strict=True):
                results[i] = r
        return results

    async def _send(self, batch: Batch) -> None:
        link, cache = self.link, self.cache
        if link is not None and cache is not None and link.up:
            if await self._send_on_link(link, cache, batch):
                return
        keys, args = self._encode(batch, ())
        await _SCRIPT.run(self.writes.call, keys, args)

    async def _send_on_link(self, link: TrackingLink, cache: NearCache, batch: Batch) -> bool:
        """The batch through the link, bringing back the hashes the near-cache wants
        renewed; False when the link went down first (then the pool takes the batch:
        Redis may have applied it, and the retry is then skipped by its id)."""
        # Reads like any other: a copy is stored only if no invalidation of its key
        # came in between (see NearCache.begin).
        began = {k: cache.begin(k) for k in batch.entries if cache.wants_refresh(k)}
        fresh: dict[str, dict[str, str]] = {}
        try:
            keys, args = self._encode(batch, began)
            own = frozenset(batch.entries)
            try:
                write: Execute = partial(link.call_own_write, own)
                reply = await _SCRIPT.run(write, keys, args, load=link.call)
                wait = self.writes.wait
                if wait is not None:
                    # On the link itself: WAIT counts this connection's writes. Session
                    # reads go through the pool meanwhile (store.load: link.free).
                    acks = await link.call_blocking(
                        "WAIT", wait.replicas, round(wait.timeout * 1000)
                    )
                    if int(acks) < wait.replicas:
                        metrics.REDIS_WAITS.labels("short").inc()
                        # Kept for retry under the same id: a copy that did reach the
                        # replicas is skipped by its id, one that did not is written.
                        raise NotReplicated(f"WAIT: {acks} of {wait.replicas} replicas")
                    metrics.REDIS_WAITS.labels("ok").inc()
            except LinkDown:
                return False
            if isinstance(reply, list):
                fresh = self._absorb(cache, batch, keys[1:], reply)
            return True
        finally:
            for k, b in began.items():
                if cache.end(k, b, fresh.get(k), spread=False):
                    metrics.NEAR_CACHE_REFRESHES.inc()

    def _absorb(
        self, cache: NearCache, batch: Batch, keys: list[str], reply: list[Any]
    ) -> dict[str, dict[str, str]]:
        """The script's per-session replies: gone sessions are invalidated (their
        invalidations may be among those ignored as our own writes), returned hashes
        become the cached copies, with the activity not yet in Redis applied on top, as
        ``record`` did to the copy they replace: batches still waiting behind this one
        (after a failed flush they can hold the same sessions), then what was recorded
        since the last flush began."""
        gone: list[str] = []
        fresh: dict[str, dict[str, str]] = {}
        for key, r in zip(keys, reply, strict=False):
            if r == 0:
                gone.append(key)
            elif isinstance(r, list):
                fresh[key] = dict(zip(r[::2], r[1::2], strict=False))
        if gone:
            cache.invalidate(gone)
        for key in [k for k, f in fresh.items() if not self.apply_unflushed(k, f, skip=batch)]:
            del fresh[key]
        return fresh

    def _encode(
        self, batch: Batch, refresh: Container[str]
    ) -> tuple[list[str], list[str | int | bytes]]:
        first = next(iter(batch.entries))
        keys = [self.keys.activity_batch(batch.id, first), *batch.entries]
        data = [
            [ts(p.last_activity), p.page, p.views, round(p.deadline, 3), int(k in refresh)]
            for k, p in batch.entries.items()
        ]
        return keys, [self.idle_ttl, ts(time.time()), orjson.dumps(data)]

    async def stop(self) -> None:
        """Stop the loop and flush what is buffered, retrying within the shutdown budget."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        deadline = time.monotonic() + self.settings.shutdown_timeout
        delay = 0.05
        while self.pending_count() and time.monotonic() < deadline:
            if await self.flush():
                break
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)
        if self.pending_count():
            log.error(
                "shutdown: %d sessions' activity could not be written (Redis unreachable)",
                self.pending_count(),
            )
        else:
            log.info("shutdown: activity flushed")
