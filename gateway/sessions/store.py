"""The session reads and writes that are not activity: load (near-cache, then Redis,
with the plugins' prefetch reads in the same pipeline), create, login, update, logout."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, cast

from .. import metrics
from ..config import SessionSettings
from ..errors import REDIS_FAILURES
from ..redis import Keys, RedisClient, public_id
from ..redis.batching import BatchedReader, Command
from ..redis.durable import Writes
from ..redis.scripts import Script
from .model import Session, new_token, ts
from .nearcache import NearCache
from .users import UserSessions

if TYPE_CHECKING:
    from ..redis.tracking import TrackingLink
    from .activity import ActivityWriter

log = logging.getLogger("gateway.sessions")

_WRITES = metrics.REDIS_COMMANDS.labels("session_write")
_READS = metrics.REDIS_COMMANDS.labels("session_read")
# Lookups by result (the resolver counts the invalid cookies and the Redis failures).
_NEAR_CACHE_HIT = metrics.SESSION_LOOKUPS.labels("near_cache_hit")
_REDIS_HIT = metrics.SESSION_LOOKUPS.labels("redis_hit")
_MISS = metrics.SESSION_LOOKUPS.labels("miss")
_EXPIRED = metrics.SESSION_LOOKUPS.labels("expired")


class SessionStore:
    def __init__(
        self,
        redis: RedisClient,
        settings: SessionSettings,
        keys: Keys,
        timeout: float = 0.5,
        cache: NearCache | None = None,
        link: TrackingLink | None = None,
        activity: ActivityWriter | None = None,
        writes: Writes | None = None,
    ) -> None:
        """``cache`` and ``link``: the near-cache and its tracking link, when it is on;
        ``activity``: the writer whose unflushed activity a hash read from Redis gets;
        ``writes``: how logins and logouts are written (per slot, WAIT; durable.py)."""
        self.redis = redis
        self.settings = settings
        self.keys = keys
        self.timeout = timeout
        self.reader = BatchedReader(redis, timeout)
        self.writes = writes or Writes(redis)
        self.users = UserSessions(redis, keys, settings, self.writes)
        self.cache = cache
        self.link = link
        self.activity = activity

    def forget(self, *key_ids: str) -> None:
        """Drop sessions this process changed from the near-cache before answering (the
        Redis invalidation for the change is on its way, but may arrive after the next
        request)."""
        if self.cache is not None:
            self.cache.invalidate([self.keys.session(k) for k in key_ids])

    def _deadline(self, fields: dict[str, str], now: float) -> float:
        try:
            start = float(fields.get("login_time", now))
        except ValueError:
            start = now
        return start + self.settings.absolute_ttl

    def from_fields(
        self, token: str, fields: dict[str, str], now: float, key_id: str
    ) -> Session | None:
        """The session these stored fields describe, or None when it has expired."""
        if not fields:
            return None
        deadline = self._deadline(fields, now)
        if now >= deadline:
            return None
        try:
            last = float(fields.get("last_activity", now))
        except ValueError:
            last = now
        if now - last > self.settings.idle_ttl:
            return None
        return Session(
            token=token,
            key_id=key_id,
            id=public_id(token) if self.keys.raw_tokens else key_id,
            fields=fields,
            deadline=deadline,
        )

    def _add_unflushed(self, key: str, fields: dict[str, str]) -> bool:
        """A hash just read from Redis gets this process's activity not yet flushed, as
        the cached copies have it, so the session's page views never go back between a
        cached and a read request. False when that cannot be told: it is not cached."""
        return not fields or self.activity is None or self.activity.apply_unflushed(key, fields)

    async def prefetch_only(self, extra: tuple[Command, ...]) -> list[Any]:
        """The results of the plugins' prefetch commands ``extra``, for a session the
        near-cache answered (they ride the tick's pipeline like any read)."""
        return (await self.reader.hgetall(None, extra))[1]

    def cached(self, token: str, key_id: str) -> tuple[bool, Session | None]:
        """(True, the session or None if it has expired) when the near-cache can answer
        on its own; (False, None) when Redis has to be asked (``load``)."""
        cache = self.cache
        if cache is None:
            return False, None
        fields = cache.get(self.keys.session(key_id))
        if fields is None:
            return False, None
        session = self.from_fields(token, fields, time.time(), key_id)
        (_NEAR_CACHE_HIT if session is not None else _EXPIRED).inc()
        return True, session

    async def load(
        self, token: str, key_id: str, extra: tuple[Command, ...] = ()
    ) -> tuple[Session | None, list[Any]]:
        """The session read from Redis (``cached`` has missed), and the results of the
        plugins' prefetch commands ``extra``, read in the same pipeline. Within
        redis.timeout (the batch enforces it)."""
        key = self.keys.session(key_id)
        cache = self.cache
        if cache is not None and cache.enabled:
            began = cache.begin(key)
            fields: dict[str, str] = {}
            others: list[Any] = []
            keep = False
            try:
                link = self.link
                if not extra and link is not None and link.free:
                    # A miss goes on the link itself: far less client work than the
                    # pool, and its reply is ordered with the link's invalidations. A
                    # failure there is a Redis failure like any other (the route's
                    # on_redis_error), within redis.timeout. Not while an activity
                    # flush's WAIT holds the link (redis.wait): a read would wait
                    # behind it, up to wait.timeout; the pool's is as safe (begin/end).
                    _READS.inc()
                    fields = await link.call("HGETALL", key)
                else:
                    fields, others = await self.reader.hgetall(key, extra)
                # Not kept: a copy that may lack or double an activity flush in flight,
                # or one without login_time (it gets one below, in Redis only).
                keep = self._add_unflushed(key, fields) and "login_time" in fields
            finally:
                cache.end(key, began, fields if keep else None)
        else:
            fields, others = await self.reader.hgetall(key, extra)
            self._add_unflushed(key, fields)
        now = time.time()
        session = self.from_fields(token, fields, now, key_id)
        (_REDIS_HIT if session is not None else _EXPIRED if fields else _MISS).inc()
        if session is not None and "login_time" not in fields:
            # A session written by other software (migrated data) has no start: it gets
            # one now, once, so the absolute lifetime is enforced from here on.
            async with asyncio.timeout(self.reader.timeout):
                _WRITES.inc()
                await self.redis.hsetnx(self.keys.session(key_id), "login_time", ts(now))
            session.fields["login_time"] = ts(now)
        return session, others

    def new_guest(self) -> Session:
        token = new_token()
        now = time.time()
        return Session(
            token=token,
            key_id=self.keys.key_id(token),
            id=public_id(token),
            fields={"login_time": ts(now), "last_activity": ts(now), "page_views": "0"},
            deadline=now + self.settings.absolute_ttl,
        )

    async def login(self, old: Session | None, fields: dict[str, str]) -> tuple[Session, list[str]]:
        """A new session (new token, always) holding ``fields``; the old one is deleted in
        the same transaction so a pre-login token never survives the login. Also the key
        ids of the user's sessions this login ended (beyond ``session.max_per_user``):
        the caller cleans up what else they own, as after a logout. Within
        redis.timeout for the login itself, and as much again for the index upkeep."""
        token = new_token()
        now = time.time()
        stored = {
            **fields,
            "login_time": ts(now),
            "last_activity": ts(now),
            "page_views": "0",
        }
        session = Session(
            token=token,
            key_id=self.keys.key_id(token),
            id=public_id(token),
            fields=stored,
            deadline=now + self.settings.absolute_ttl,
        )
        key = self.keys.session(session.key_id)
        uid = stored["user_id"]
        user_set = self.keys.user_sessions(uid)
        new_session = [
            ("HSET", key, *[x for kv in stored.items() for x in kv]),
            ("EXPIRE", key, self.settings.idle_ttl),
        ]
        index = [
            ("SADD", user_set, session.key_id),
            # The index lives as long as the newest session could.
            ("EXPIRE", user_set, self.settings.absolute_ttl),
            self.users.sample_command(uid),
        ]
        old_session: list[Command] = []
        old_index: list[Command] = []
        if old is not None:
            old_session.append(("DEL", self.keys.session(old.key_id)))
            if old.user_id:
                old_index.append(("SREM", self.keys.user_sessions(old.user_id), old.key_id))
        _WRITES.inc(len(new_session) + len(index) - 1 + len(old_session) + len(old_index))
        _READS.inc()
        async with asyncio.timeout(self.timeout):
            # One node: the four steps are one transaction (and one WAIT). A cluster:
            # one transaction per slot, in this order, and what holds if it stops after:
            res = await self.writes.run(
                # 1. The new session (its slot). No cookie names it yet: stopped here,
                #    it expires unused after idle_ttl.
                new_session,
                # 2. Listed in its user's index (the user's slot) before its cookie
                #    exists, so a logout everywhere always finds it. Stopped here, the
                #    login is answered 503 and the listed id dies with its hash.
                index,
                # 3. The old session ends before the new token is handed out. Stopped
                #    before this, the login is answered 503 and the client keeps its old
                #    session exactly as it was: no token outlives a login it saw.
                old_session,
                # 4. The old id leaves its user's index; stopped before this, a dead id
                #    stays listed until that user's next login drops it.
                old_index,
            )
            members = res[1][-1]
        if old is not None:
            self.forget(old.key_id)
        ended: list[str] = []
        try:
            async with asyncio.timeout(self.timeout):
                newest = (float(stored["login_time"]), session.key_id)
                ended = await self.users.trim(uid, newest, members)
        except REDIS_FAILURES as e:
            # The login itself is done and its cookie must reach the client; the next
            # login does the upkeep again. Sessions ended by a step whose reply was lost
            # keep their cart and viewed list until those expire.
            metrics.REDIS_ERRORS.labels("trim").inc()
            log.warning("user session index upkeep failed: %s: %s", type(e).__name__, e)
        self.forget(*ended)
        return session, ended

    async def count_guest(self, bucket: str) -> int:
        """Count one more guest for this client address; the count of this minute."""
        key = self.keys.guest_counter(bucket)
        count = await _COUNT_GUEST.run(self.redis.execute_command, [key])
        return int(count)

    async def create(self, session: Session) -> None:
        """Write a new anonymous (guest) session."""
        key = self.keys.session(session.key_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=cast(Any, session.fields))
            pipe.expire(key, self.settings.idle_ttl)
            _WRITES.inc(2)
            await pipe.execute()

    async def update(self, session: Session, fields: dict[str, str]) -> None:
        key = self.keys.session(session.key_id)
        # Only an existing hash is updated: a Set racing a logout must not resurrect it.
        await _HSET_IF_EXISTS.run(
            self.redis.execute_command, [key], [x for kv in fields.items() for x in kv]
        )
        self.forget(session.key_id)
        session.fields.update(fields)

    async def delete(self, key_id: str) -> bool:
        """Delete one session by key id, and its place in its user's index; False when
        it was gone already."""
        key = self.keys.session(key_id)
        _READS.inc()
        uid = await self.redis.hget(key, "user_id")
        res = await self._end(key_id, str(uid) if uid else None)
        self.forget(key_id)
        return bool(res[0][0])

    async def _end(self, key_id: str, user_id: str | None) -> list[list[Any]]:
        """Delete a session, then its id from its user's index: one transaction on one
        node; in a cluster the session (its slot) goes first, so that stopped between
        the two only a dead id stays listed (the next login's upkeep drops it)."""
        index = [("SREM", self.keys.user_sessions(user_id), key_id)] if user_id else []
        _WRITES.inc(1 + len(index))
        return await self.writes.run([("DEL", self.keys.session(key_id))], index)

    async def logout(self, session: Session, everywhere: bool) -> AsyncGenerator[list[str]]:
        """End this session, then (``everywhere``) every other one of its user, in steps
        of a round trip or two, each bounded by the caller's timeout. Each step yields
        the key ids it ended (their hashes are gone). The first ends this session,
        whatever the user's index holds; what a failure leaves, the next logout
        everywhere ends (``UserSessions.end_all``)."""
        uid = session.user_id
        await self._end(session.key_id, uid)
        self.forget(session.key_id)
        yield [session.key_id]
        if everywhere and uid:
            async for ids in self.users.end_all(uid):
                self.forget(*ids)
                yield ids


# KEYS[1] = the address's guest counter. Atomic, so the counter always has its TTL (SET
# NX EX then INCR could lose it to an expiry in between: a counter for ever).
_COUNT_GUEST = Script(
    """
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], 60) end
return n
""",
    op="session_write",
)

_HSET_IF_EXISTS = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HSET', KEYS[1], unpack(ARGV))
end
return -1
""",
    op="session_write",
)
