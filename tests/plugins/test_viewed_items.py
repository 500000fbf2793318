"""Recently viewed items and the popularity ranking, written behind."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient

from ..conftest import (
    GatewayFactory,
    RedisServer,
    Upstream,
    base_config,
    login,
    start_guest,
    wait_for,
)

ROUTES: list[dict[str, Any]] = [
    {"path": "/login", "upstream": "app", "session": "optional", "instructions": ["login"]},
    {
        "path": "/",
        "upstream": "app",
        "session": "optional",
        "guest": True,
        "instructions": ["set"],
    },
]


async def viewed_gateway(make_gateway: GatewayFactory, **opts: Any) -> TestClient:
    opts.setdefault("flush_interval", 0.02)
    return await make_gateway(routes=ROUTES, plugins=[{"viewed_items": opts}])


async def visit(gw: TestClient, *paths: str, method: str = "GET") -> str:
    for p in paths:
        resp = await gw.request(method, p)
        assert resp.status in (200, 404)
    return ""


def viewed(rdb: redis.Redis, sid: str) -> list[str]:
    return rdb.zrevrange(f"viewed:{sid}", 0, -1)  # type: ignore[return-value]


async def test_views_are_recorded_newest_first_and_ranked(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await viewed_gateway(make_gateway)
    await start_guest(gw, upstream)
    await visit(gw, "/products/a", "/products/b", "/products/a", "/cart", "/products/c/reviews")
    sid = upstream.last.header("X-Session-Id")
    assert sid
    await wait_for(lambda: viewed(rdb, sid) == ["a", "b"])
    await wait_for(
        lambda: rdb.zrevrange("viewed:ranking", 0, -1, withscores=True) == [("a", 2.0), ("b", 1.0)]
    )
    assert 0 < rdb.ttl(f"viewed:{sid}") <= 7 * 86400  # type: ignore[operator]


async def test_only_the_last_keep_items_are_kept(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await viewed_gateway(make_gateway, keep=3)
    await start_guest(gw, upstream)
    await visit(gw, "/start")
    sid = upstream.last.header("X-Session-Id")
    assert sid
    for i in range(6):
        await visit(gw, f"/products/p{i}")
    await wait_for(lambda: viewed(rdb, sid) == ["p5", "p4", "p3"])
    await wait_for(lambda: rdb.zcard("viewed:ranking") == 6)


async def test_failed_pages_and_other_methods_do_not_count(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text="no such product")

    upstream.routes["/products/nope"] = missing
    gw = await viewed_gateway(make_gateway)
    await visit(gw, "/products/nope")
    await visit(gw, "/products/posted", method="POST")
    await visit(gw, "/products/real")
    await wait_for(lambda: rdb.zrange("viewed:ranking", 0, -1) == ["real"])
    assert rdb.zscore("viewed:ranking", "nope") is None


async def test_header_lists_recent_items_including_unflushed_ones(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await viewed_gateway(make_gateway, header=True, flush_interval=10)
    await start_guest(gw, upstream)
    await visit(gw, "/start")
    assert upstream.last.header("X-Session-Viewed") == ""
    await visit(gw, "/products/a", "/products/b%2Cc")
    await visit(gw, "/next")
    # Not flushed yet (interval 10 s): served from the buffer. Each item is
    # percent-encoded (so "," separates), then the value as every X-Session-* header.
    value = upstream.last.header("X-Session-Viewed")
    assert value is not None
    assert [unquote(i) for i in unquote(value).split(",")] == ["b,c", "a"]
    assert rdb.zcard("viewed:ranking") == 0


async def test_login_keeps_the_history(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await viewed_gateway(make_gateway)
    await start_guest(gw, upstream)
    await visit(gw, "/products/a", "/products/b")
    guest = upstream.last.header("X-Session-Id")
    assert guest
    await wait_for(lambda: rdb.exists(f"session:{guest}"))
    await login(gw, upstream, "7")
    await visit(gw, "/products/c")
    sid = upstream.last.header("X-Session-Id")
    assert sid and sid != guest
    await wait_for(lambda: viewed(rdb, sid) == ["c", "b", "a"])
    assert not rdb.exists(f"viewed:{guest}")


async def test_shutdown_flushes_the_buffer(
    redis_server: RedisServer, upstream: Upstream, rdb: redis.Redis
) -> None:
    from aiohttp.test_utils import TestServer

    from gateway.app import build_app
    from gateway.config import parse_settings

    cfg = base_config(
        redis_server.url,
        upstream.url,
        routes=ROUTES,
        plugins=[{"viewed_items": {"flush_interval": 10}}],
    )
    client = TestClient(TestServer(build_app(parse_settings(cfg)), host="127.0.0.1"))
    await client.start_server()
    await visit(client, "/products/x")
    assert rdb.zcard("viewed:ranking") == 0
    await client.close()
    assert rdb.zrange("viewed:ranking", 0, -1, withscores=True) == [("x", 1.0)]


async def test_requests_do_not_wait_for_redis_writes(
    make_gateway: GatewayFactory, upstream: Upstream, redis_server: RedisServer
) -> None:
    # Session routes need Redis to resolve sessions; a route without sessions shows the
    # view path itself never touches Redis.
    gw = await make_gateway(
        routes=[{"path": "/", "upstream": "app", "session": "none"}],
        plugins=[{"viewed_items": {"flush_interval": 0.02}}],
    )
    redis_server.kill()
    for _ in range(3):
        assert (await gw.get("/products/a")).status == 200


def test_pattern_is_validated() -> None:
    from plugins.viewed_items import ViewedItemsConfig

    with pytest.raises(ValueError, match="exactly once"):
        ViewedItemsConfig(pattern="/products/")
    assert ViewedItemsConfig(pattern="/p/{item}/view").pattern == "/p/{item}/view"
