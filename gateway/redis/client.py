"""Config → Redis clients: the one place a connection is made.

``open_redis`` turns ``redis:`` into a :class:`RedisLayer`: the client every command goes
through, the factory of the near-cache's tracking link (same master, same timeouts),
the durable writes (durable.py), the key names, and the embedded ``redis-server`` when
``redis.url: embedded``. One topology each:

- ``redis.url``: one server (``redis://``, ``rediss://`` with ``redis.tls``, ``unix://``,
  ``embedded``);
- ``redis.sentinel``: the master a group of Sentinels names (sentinel.py), followed
  through failovers by the client and by the tracking link;
- ``redis.cluster``: a Redis Cluster (cluster.py); keys carry hash tags, and the
  near-cache is off (its tracking would have to follow every master).

Nothing outside this package builds a Redis connection.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

from .. import metrics
from ..config import ConfigError, RedisSettings, RedisTlsSettings, Settings
from .cluster import cluster_client
from .durable import Writes
from .embedded import EmbeddedRedis
from .keys import Keys
from .scripts import BoundScript, Script
from .sentinel import MasterWatch, Sentinels, master_pool, sentinels
from .tracking import Listener, TrackingLink

log = logging.getLogger("gateway")

# What the core and plugins hold: one name for "a Redis client", a single node's (or a
# Sentinel master's) or a cluster's; both take the same commands, pipelines and scripts.
RedisClient = Redis | RedisCluster


def tls_options(tls: RedisTlsSettings | None) -> dict[str, Any]:
    """redis-py's connection options for ``redis.tls`` (empty: no TLS options)."""
    if tls is None:
        return {}
    opts: dict[str, Any] = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.verify else ssl.CERT_NONE,
        "ssl_check_hostname": tls.verify,
    }
    if tls.ca is not None:
        opts["ssl_ca_certs"] = tls.ca
    if tls.cert is not None:
        opts["ssl_certfile"] = tls.cert
        opts["ssl_keyfile"] = tls.key
    return opts


def check_tls(tls: RedisTlsSettings | None) -> None:
    """Load ``redis.tls``'s files now, so that a bad one stops the start and --check
    with one line naming its key (ConfigError), not every connection later."""
    if tls is None:
        return
    ctx = ssl.create_default_context()
    try:
        if tls.ca is not None:
            ctx.load_verify_locations(cafile=tls.ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"redis.tls.ca: cannot load {tls.ca}: {e}") from None
    if tls.cert is not None and tls.key is not None:
        try:
            ctx.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"redis.tls.cert: cannot load {tls.cert} with key {tls.key}: {e}"
            ) from None


def _options(settings: RedisSettings) -> dict[str, Any]:
    """The connection and pool options every topology shares."""
    return {
        "max_connections": settings.max_connections,
        "timeout": settings.timeout,  # waiting for a free connection counts against the call
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.connect_timeout,
        "decode_responses": True,
        # A stored value that is not UTF-8 (written by other software) must not make a
        # read fail: its bytes survive as lone surrogates (headers.encode_value).
        "encoding_errors": "surrogateescape",
        "health_check_interval": 30,
    }


def make_client(
    url: str, settings: RedisSettings, watch: MasterWatch | None = None
) -> RedisClient:
    """The client for ``settings``' topology (``url``: the server's, for redis.url;
    ``watch``: the Sentinel watch a Sentinel master's pool follows)."""
    tls = tls_options(settings.tls)
    if settings.cluster is not None:
        return cluster_client(settings.cluster, settings, tls)
    if settings.sentinel is not None:
        if watch is None:
            watch = MasterWatch(
                _sentinels(settings, tls), settings.sentinel.check_interval
            )
        return Redis(
            connection_pool=master_pool(
                watch.sentinels, settings.sentinel, tls, **_options(settings)
            )
        )
    extra = tls if url.startswith("rediss://") else {}
    pool = BlockingConnectionPool.from_url(url, **_options(settings), **extra)
    # No retries (redis-py's default with a pool given): a failed call is the route's
    # on_redis_error to decide, within redis.timeout, not the client's to repeat.
    return Redis(connection_pool=pool)


async def close_client(client: RedisClient) -> None:
    """Close a client from make_client and its connections (a single-node client's pool
    is closed only when asked)."""
    if isinstance(client, Redis):
        await client.aclose(close_connection_pool=True)
    else:
        await client.aclose()


def _sentinels(settings: RedisSettings, tls: dict[str, Any]) -> Sentinels:
    assert settings.sentinel is not None
    return sentinels(
        settings.sentinel,
        settings.timeout,
        settings.connect_timeout,
        {"ssl": True, **tls} if tls else {},
    )


async def start_embedded(settings: RedisSettings) -> tuple[str, EmbeddedRedis | None]:
    """The URL to use: ``redis.url``, or for ``embedded`` that of a private
    ``redis-server`` started now (the caller stops it after its last flush). Under
    redis.sentinel or redis.cluster there is no URL: the empty string."""
    if settings.topology != "url":
        return "", None
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
        self.watch: MasterWatch | None = None
        if settings.sentinel is not None:
            self.watch = MasterWatch(
                _sentinels(settings, tls_options(settings.tls)),
                settings.sentinel.check_interval,
            )
            self.watch.listeners.append(_count_change)
        self.client = make_client(url, settings, self.watch)
        self.writes = Writes(self.client, settings.wait)
        self._embedded = embedded

    @property
    def timeout(self) -> float:
        return self.settings.timeout

    @property
    def cluster(self) -> bool:
        return isinstance(self.client, RedisCluster)

    def start(self) -> None:
        """Background work of the layer: the Sentinel watch (asks where the master is)."""
        if self.watch is not None:
            self.watch.start()

    def on_master_change(self, listener: Callable[[tuple[str, int]], None]) -> None:
        """Call ``listener`` with the new master's address whenever the Sentinels name
        another one (never, for the other topologies)."""
        if self.watch is not None:
            self.watch.listeners.append(listener)

    def script(self, source: str, op: str | None = None) -> BoundScript:
        """A Lua script run on this layer's client (EVALSHA, NOSCRIPT handled)."""
        return BoundScript(Script(source, op), self.client.execute_command)

    def tracking_link(self, prefix: str, listener: Listener) -> TrackingLink | None:
        """The near-cache's dedicated connection to the same master; None where the
        near-cache cannot be kept coherent (a cluster), with the reason logged."""
        s = self.settings
        if s.cluster is not None:
            log.warning(
                "near-cache off: redis.cluster (invalidation tracking would have to follow "
                "every master and every slot move; each request reads its session from "
                "the cluster instead)"
            )
            return None
        pool: ConnectionPool
        options = {
            "protocol": 3,
            "decode_responses": True,
            # As the pool's: a value that is not UTF-8 must not break the link, which
            # would turn the near-cache off for every session.
            "encoding_errors": "surrogateescape",
            "socket_timeout": s.timeout,
            "socket_connect_timeout": s.connect_timeout,
        }
        tls = tls_options(s.tls)
        if s.sentinel is not None:
            assert self.watch is not None
            # Connects to the master the watch names, checks its role, and is told
            # when the master moves (the link then drops and reconnects to the new one,
            # emptying the cache across the gap).
            pool = master_pool(self.watch.sentinels, s.sentinel, tls, **options)
        else:
            extra = tls if self.url.startswith("rediss://") else {}
            pool = ConnectionPool.from_url(self.url, **options, **extra)
        link = TrackingLink(pool, prefix, listener, s.timeout)
        if self.watch is not None:
            self.watch.listeners.append(link.master_moved)
        return link

    async def close(self) -> None:
        await self.writes.close()
        if self.watch is not None:
            await self.watch.stop()
        await close_client(self.client)
        if self._embedded is not None:
            await self._embedded.stop()


def _count_change(address: tuple[str, int]) -> None:
    metrics.REDIS_MASTER_CHANGES.inc()


async def open_redis(settings: Settings) -> RedisLayer:
    url, embedded = await start_embedded(settings.redis)
    keys = Keys(
        settings.session.key_prefix,
        raw_tokens=settings.session.raw_token_keys,
        # Under a cluster every multi-key operation must stay in one slot (keys.py).
        hash_tags=settings.redis.topology == "cluster",
    )
    layer = RedisLayer(settings.redis, url, keys, embedded)
    layer.start()
    return layer
