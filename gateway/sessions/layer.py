"""The session layer as one unit: store, near-cache, tracking link, activity writer, and
the services built on them (the resolver and the actions), wired in one place that the
app's runtime and the benchmarks both use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import Settings
from ..redis import RedisLayer
from ..redis.tracking import TrackingLink
from .actions import SessionActions
from .activity import ActivityWriter
from .cookies import SessionCookie
from .nearcache import NearCache
from .resolver import SessionResolver
from .store import SessionStore

if TYPE_CHECKING:
    from ..chain import Chain


class SessionLayer:
    def __init__(self, settings: Settings, redis: RedisLayer, chain: Chain) -> None:
        s = settings.session
        keys = redis.keys
        self.keys = keys
        self.cache: NearCache | None = None
        self.link: TrackingLink | None = None
        if s.near_cache.enabled:
            cache = NearCache(s.near_cache)
            # None where the topology cannot keep a near-cache coherent (the reason is
            # logged): every request then reads its session from Redis.
            self.link = redis.tracking_link(keys.session_prefix(), cache)
            if self.link is not None:
                self.cache = cache
        self.activity = ActivityWriter(
            redis.client,
            settings.activity,
            s.idle_ttl,
            keys,
            self.link,
            self.cache,
            writes=redis.writes,
        )
        self.store = SessionStore(
            redis.client,
            s,
            keys,
            redis.timeout,
            self.cache,
            self.link,
            self.activity,
            writes=redis.writes,
        )
        # Activity kept through a failover goes to the new master at once.
        redis.on_master_change(self.activity.retry_now)
        self.cookie = SessionCookie(settings)
        self.actions = SessionActions(settings, self.store, self.activity, chain)
        self.resolver = SessionResolver(self.store, chain, self.cookie, self.actions)

    def start(self) -> None:
        if self.link is not None:
            self.link.start()
        self.activity.start()

    async def stop(self) -> None:
        """Flush buffered activity (within activity.shutdown_timeout), then drop the
        link."""
        await self.activity.stop()
        if self.link is not None:
            await self.link.stop()
