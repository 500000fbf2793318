"""A near-cache of session hashes, kept coherent by Redis itself.

Every proxied request needs its session; most sessions are read again and again within
seconds. Serving them from this process's memory saves the HGETALL round trip, which the
benchmark profile showed to be the biggest cost sessions add to a request.

Coherence comes from Redis's server-assisted client-side caching (CLIENT TRACKING, Redis
6+), in broadcast mode: one dedicated RESP3 connection (the *link*) asks Redis to push an
``invalidate`` message for every change to a key under ``<key_prefix>session:``, made by
anyone — another gateway process, a login or logout here, an operator's HSET, an expiry,
an eviction, a FLUSHDB. The link (redis/tracking.py) is also the connection this
process's write-behind activity goes through, with NOLOOP: the link's own writes don't
invalidate. The activity writer applies each recorded request to the cached copy instead
(``update``), so the copy stays what Redis will hold; the cache knows no session field.

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

import collections
import random
import time
from collections.abc import Callable
from typing import Any

from .. import metrics
from ..config import NearCacheSettings

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

    def update(self, key: str, change: Callable[..., bool], *args: Any) -> None:
        """Apply ``change(fields, *args)`` to the cached copy of ``key``, if there is one;
        the copy goes when ``change`` says it could not be applied."""
        entry = self._entries.get(key)
        if entry is not None and not change(entry[0], *args):
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
