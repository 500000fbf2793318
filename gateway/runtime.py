"""Everything a gateway process runs on, built from the settings: one ``cleanup_ctx``
per resource, in dependency order, so that shutdown releases them in reverse (plugins'
background work drained, upstream pools closed, activity flushed, plugins stopped,
Redis closed last); the process's sampled gauges (gauges.py) run beside them.

The :class:`Runtime` holds them; the proxy app and the admin app are both fed from it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from .chain import Chain, build_chain
from .config import Settings
from .gauges import ProcessGauges
from .plugin import Services
from .proxy import Gateway
from .redis import RedisLayer, open_redis
from .routing import RouteTable
from .sessions.layer import SessionLayer

log = logging.getLogger("gateway")


class Runtime:
    """Set resource by resource as the app starts (read them once it has)."""

    redis: RedisLayer
    chain: Chain
    sessions: SessionLayer
    table: RouteTable
    ws_client: aiohttp.ClientSession
    gateway: Gateway

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Run first when the app stops, once requests are done (a reload's swapped-out
        # routes and plugins are closed here: reload.py).
        self.on_stop: list[Callable[[], Awaitable[None]]] = []


RUNTIME = web.AppKey("runtime", Runtime)

Ctx = Callable[[web.Application], AsyncIterator[None]]


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    rt.redis = await open_redis(rt.settings)
    try:
        yield
    finally:
        await rt.redis.close()


async def plugins_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    redis = rt.redis
    services = Services(
        rt.settings, redis.client, redis.keys, redis.timeout, redis.script, redis.cluster
    )
    rt.chain = build_chain(rt.settings, services)
    # Every plugin started (startup stops the started ones and raises otherwise).
    await rt.chain.startup()
    try:
        yield
    finally:
        # The chain in place now: a reload may have swapped in another one.
        await rt.chain.shutdown()


async def sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    rt.sessions = SessionLayer(rt.settings, rt.redis, rt.chain)
    rt.sessions.start()
    try:
        yield
    finally:
        await rt.sessions.stop()


async def upstreams_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    upstreams = rt.settings.upstreams.values()
    rt.table = RouteTable(rt.settings)
    # For WebSocket upgrades only: plain requests use the lean pools in upstream_client.
    rt.ws_client = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=sum(u.max_connections for u in upstreams),
            limit_per_host=max(u.max_connections for u in upstreams),
            ttl_dns_cache=60,
        ),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),  # the gateway never keeps backend cookies
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
    )
    try:
        yield
    finally:
        # Also when draining was cut short: idle upstream sockets must not linger.
        rt.table.close()
        await rt.ws_client.close()


async def proxy_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    rt.gateway = Gateway(rt.settings, rt.table, rt.sessions, rt.chain, rt.ws_client)
    yield
    for stop in rt.on_stop:
        await stop()
    await rt.chain.drain(5.0)


async def gauges_ctx(app: web.Application) -> AsyncIterator[None]:
    gauges = ProcessGauges(app[RUNTIME])
    gauges.start()
    yield
    await gauges.stop()


CONTEXTS: tuple[Ctx, ...] = (
    redis_ctx,
    plugins_ctx,
    sessions_ctx,
    upstreams_ctx,
    proxy_ctx,
    gauges_ctx,
)
