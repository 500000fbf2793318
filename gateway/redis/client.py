"""Config → Redis clients: the one place a connection is made.

``open_redis`` turns ``redis:`` into a :class:`RedisLayer`: the pool every command goes
through, the factory of the near-cache's tracking link (same server, same timeouts), the
key names, and the embedded ``redis-server`` when ``redis.url: embedded``. A new
topology (Sentinel, Cluster) is one more branch in ``_client`` and ``tracking_link``;
nothing outside this package builds a Redis connection.
"""

from __future__ import annotations

import logging
from pathlib import Path

from redis.asyncio import BlockingConnectionPool, Redis

from ..config import RedisSettings, Settings
from .embedded import EmbeddedRedis
from .keys import Keys
from .scripts import BoundScript, Script
from .tracking import Listener, TrackingLink

log = logging.getLogger("gateway")

# What the core and plugins hold: one name for "a Redis client", so that a cluster
# client can take its place without touching their signatures.
RedisClient = Redis


def make_client(url: str, settings: RedisSettings) -> RedisClient:
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=settings.max_connections,
        timeout=settings.timeout,  # waiting for a free connection counts against the call
        socket_timeout=settings.timeout,
        socket_connect_timeout=settings.connect_timeout,
        decode_responses=True,
        # A stored value that is not UTF-8 (written by other software) must not make a
        # read fail: its bytes survive as lone surrogates (headers.encode_value).
        encoding_errors="surrogateescape",
        health_check_interval=30,
    )
    # No retries (redis-py's default with a pool given): a failed call is the route's
    # on_redis_error to decide, within redis.timeout, not the client's to repeat.
    return Redis(connection_pool=pool)


async def start_embedded(settings: RedisSettings) -> tuple[str, EmbeddedRedis | None]:
    """The URL to use: ``redis.url``, or for ``embedded`` that of a private
    ``redis-server`` started now (the caller stops it after its last flush)."""
    if settings.url != "embedded":
        return settings.url, None
    embedded = EmbeddedRedis(Path(settings.data_dir))
    url = await embedded.start()
    log.info("embedded redis-server started at %s", url)
    return url, embedded


class RedisLayer:
    def __init__(
        self,
        settings: RedisSettings,
        url: str,
        keys: Keys,
        embedded: EmbeddedRedis | None = None,
    ) -> None:
        self.settings = settings
        self.url = url
        self.keys = keys
        self.client = make_client(url, settings)
        self._embedded = embedded

    @property
    def timeout(self) -> float:
        return self.settings.timeout

    def script(self, source: str, op: str | None = None) -> BoundScript:
        """A Lua script run on this layer's client (EVALSHA, NOSCRIPT handled)."""
        return BoundScript(Script(source, op), self.client.execute_command)

    def tracking_link(self, prefix: str, listener: Listener) -> TrackingLink:
        """The near-cache's dedicated connection to the same server."""
        return TrackingLink(
            self.url, prefix, listener, self.settings.timeout, self.settings.connect_timeout
        )

    async def close(self) -> None:
        await self.client.aclose(close_connection_pool=True)
        if self._embedded is not None:
            await self._embedded.stop()


async def open_redis(settings: Settings) -> RedisLayer:
    url, embedded = await start_embedded(settings.redis)
    keys = Keys(settings.session.key_prefix, raw_tokens=settings.session.raw_token_keys)
    return RedisLayer(settings.redis, url, keys, embedded)
