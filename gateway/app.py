"""The aiohttp application: long-lived resources in cleanup_ctx, in dependency order,
so shutdown releases them in reverse (activity is flushed before Redis is closed)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import BlockingConnectionPool, Redis

from .activity import ActivityWriter
from .config import Settings
from .errors import REDIS_FAILURES
from .nearcache import NearCache, TrackingLink
from .plugin import Services, build_chain
from .proxy import Gateway
from .sessions import Keys, SessionStore

log = logging.getLogger("gateway")

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
REDIS_URL = web.AppKey("redis_url", str)  # the embedded server's once it is started
GATEWAY = web.AppKey("gateway", Gateway)
ACTIVITY = web.AppKey("activity", ActivityWriter)
GATEWAY_APP = web.AppKey("gateway_app", web.Application)


def make_redis(url: str, settings: Settings) -> Redis:
    r = settings.redis
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=r.max_connections,
        timeout=r.timeout,  # waiting for a free connection counts against the call
        socket_timeout=r.timeout,
        socket_connect_timeout=r.connect_timeout,
        decode_responses=True,
        health_check_interval=30,
    )
    return Redis(connection_pool=pool)


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    url = settings.redis.url
    embedded = None
    if url == "embedded":
        from .embedded import EmbeddedRedis

        embedded = EmbeddedRedis(Path(settings.redis.data_dir))
        url = await embedded.start()
        log.info("embedded redis-server started at %s", url)
    redis = make_redis(url, settings)
    app[REDIS] = redis
    app[REDIS_URL] = url
    try:
        yield
    finally:
        await redis.aclose(close_connection_pool=True)
        if embedded is not None:
            await embedded.stop()


async def _core_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = app[REDIS]
    keys = Keys(settings.session.key_prefix, raw_tokens=settings.session.raw_token_keys)
    link: TrackingLink | None = None
    if settings.session.near_cache.enabled:
        link = TrackingLink(
            app[REDIS_URL],
            keys.session_affixes()[0],
            NearCache(settings.session.near_cache),
            settings.redis.timeout,
            settings.redis.connect_timeout,
        )
        link.start()
    activity = ActivityWriter(
        redis, settings.activity, settings.session.idle_ttl, settings.session.key_prefix, link
    )
    store = SessionStore(
        redis, settings.session, keys, settings.redis.timeout, link, activity.overlay
    )
    activity.start()
    app[ACTIVITY] = activity
    services = Services(settings, redis, keys, store, activity, settings.redis.timeout)
    chain = build_chain(settings, services)
    # For WebSocket upgrades only: plain requests use the lean pools in upstream_client.
    client = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=sum(u.max_connections for u in settings.upstreams.values()),
            limit_per_host=max(u.max_connections for u in settings.upstreams.values()),
            ttl_dns_cache=60,
        ),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),  # the gateway never keeps backend cookies
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
    )
    started = []
    gw: Gateway | None = None
    try:
        for p in chain.plugins:
            await p.startup()
            started.append(p)
        gw = Gateway(settings, store, activity, chain, client)
        app[GATEWAY] = gw
        yield
        await gw.drain_background(5.0)
    finally:
        if gw is not None:
            # Also when draining was cut short: idle upstream sockets must not linger.
            gw.close_upstreams()
        for p in reversed(started):
            try:
                await p.shutdown()
            except Exception:
                log.exception("plugin %s: shutdown failed", p.name)
        await client.close()
        await activity.stop()
        if link is not None:
            await link.stop()


async def _proxy(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].handle(request)


def server_kwargs(settings: Settings) -> dict[str, Any]:
    """Options for aiohttp's request handler; every runner of the gateway app uses them
    (server.GatewayRunner in production, testing.GatewayTestServer in tests)."""
    return {
        # Bodies pass through as sent: aiohttp would otherwise inflate a gzip upload and
        # forward it under its original Content-Encoding and Content-Length.
        "auto_decompress": False,
        "max_field_size": settings.max_request_header_size,
        "max_line_size": settings.max_request_header_size,
        # A head is bounded as a whole by limits.max_header_bytes (server.py); aiohttp's
        # count of header lines must not refuse a smaller head first. The shortest line
        # is 4 bytes ("a:\r\n").
        "max_headers": settings.limits.max_header_bytes // 4,
        # Idle keep-alive connections, and connections that never send, are closed after
        # this (aiohttp's default is an hour).
        "keepalive_timeout": settings.limits.keepalive_timeout,
        # Off by default: a line per request costs more than proxying it.
        "access_log": logging.getLogger("gateway.access") if settings.logging.access_log else None,
    }


def build_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=0)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_core_ctx)
    # One catch-all handler: routing is the gateway's own (longest prefix, methods, host),
    # and aiohttp's router must not normalise or reject paths the backend should see.
    app.router.add_route("*", "/{tail:.*}", _proxy)
    return app


async def _healthz(request: web.Request) -> web.Response:
    gw_app = request.app[GATEWAY_APP]
    started = time.perf_counter()
    try:
        await gw_app[REDIS].ping()
    except REDIS_FAILURES as e:
        return web.json_response({"status": "degraded", "redis": str(e)}, status=503)
    ms = (time.perf_counter() - started) * 1000
    pending = gw_app[ACTIVITY].pending_count()
    return web.json_response(
        {"status": "ok", "redis_ms": round(ms, 2), "activity_pending": pending}
    )


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_admin_app(gateway_app: web.Application) -> web.Application:
    app = web.Application()
    app[GATEWAY_APP] = gateway_app
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app
