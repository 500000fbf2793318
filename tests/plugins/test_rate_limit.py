"""Rate limiting through the gateway with a real Redis (and a killed one)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient

from ..conftest import GatewayFactory, RedisServer, Upstream, login, wait_for


async def limited(make_gateway: GatewayFactory, **opts: Any) -> TestClient:
    return await make_gateway(plugins=[{"rate_limit": opts}])


async def test_limit_then_429_with_headers(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await limited(make_gateway, per="address", limit=3, window=60)
    remaining = []
    for _ in range(3):
        resp = await gw.get("/page")
        assert resp.status == 200
        assert resp.headers["RateLimit-Limit"] == "3"
        assert resp.headers["RateLimit-Policy"] == "3;w=60"
        remaining.append(resp.headers["RateLimit-Remaining"])
        assert 0 < int(resp.headers["RateLimit-Reset"]) <= 60
    assert remaining == ["2", "1", "0"]
    resp = await gw.get("/page")
    assert resp.status == 429
    assert 0 < int(resp.headers["Retry-After"]) <= 60
    assert resp.headers["RateLimit-Remaining"] == "0"
    assert resp.headers["RateLimit-Limit"] == "3"
    assert len(upstream.received) == 3  # the refused request never reached the backend


async def test_concurrent_requests_never_exceed_the_limit(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await limited(make_gateway, per="address", limit=10, window=60)
    results = await asyncio.gather(*(gw.get("/page") for _ in range(30)))
    assert sorted(r.status for r in results) == [200] * 10 + [429] * 20
    assert len(upstream.received) == 10


async def test_window_slides(make_gateway: GatewayFactory) -> None:
    gw = await limited(make_gateway, per="address", limit=2, window=0.3)
    assert [(await gw.get("/p")).status for _ in range(3)] == [200, 200, 429]
    started = time.monotonic()

    async def allowed() -> bool:
        return (await gw.get("/p")).status == 200

    while not await allowed():
        assert time.monotonic() - started < 2
        await asyncio.sleep(0.05)


async def test_per_session_limits_each_session_separately(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await limited(make_gateway, per="session", limit=2, window=60)
    await login(gw, upstream, "1")  # counted against the address: no session yet
    assert [(await gw.get("/p")).status for _ in range(3)] == [200, 200, 429]
    gw.session.cookie_jar.clear()
    await login(gw, upstream, "2")
    assert (await gw.get("/p")).status == 200
    assert len(rdb.keys("ratelimit:s:*")) == 2


async def test_guest_without_cookie_is_limited_by_address(
    make_gateway: GatewayFactory,
) -> None:
    # A client dropping its cookie gets a new guest session every time: the session
    # would be a fresh identity, so the address is used.
    gw = await make_gateway(
        routes=[{"path": "/", "upstream": "app", "guest": True}],
        plugins=[{"rate_limit": {"per": "session", "limit": 2, "window": 60}}],
    )
    statuses = []
    for _ in range(3):
        gw.session.cookie_jar.clear()
        statuses.append((await gw.get("/p")).status)
    assert statuses == [200, 200, 429]


@pytest.mark.parametrize("policy,status", [("allow", 200), ("deny", 503)])
async def test_redis_down(
    make_gateway: GatewayFactory,
    upstream: Upstream,
    redis_server: RedisServer,
    policy: str,
    status: int,
) -> None:
    gw = await make_gateway(
        routes=[{"path": "/", "upstream": "app", "session": "none"}],
        plugins=[{"rate_limit": {"per": "address", "limit": 5, "on_redis_error": policy}}],
    )
    assert (await gw.get("/p")).status == 200
    redis_server.kill()
    started = time.monotonic()
    resp = await gw.get("/p")
    assert resp.status == status
    assert time.monotonic() - started < 2  # no hang: bounded by redis.timeout
    assert "RateLimit-Remaining" not in resp.headers
    if policy == "deny":
        assert resp.headers["Retry-After"] == "5"
        assert len(upstream.received) == 1
    # Redis back: limiting resumes.
    redis_server.start()

    async def counted() -> bool:
        r = await gw.get("/p")
        return "RateLimit-Remaining" in r.headers

    deadline = time.monotonic() + 5
    while not await counted():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_trusted_proxy_address(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(
        trusted_proxies=["127.0.0.1/32"],
        plugins=[{"rate_limit": {"per": "address", "limit": 1, "window": 60}}],
    )
    a = {"X-Forwarded-For": "203.0.113.7"}
    b = {"X-Forwarded-For": "198.51.100.1, 203.0.113.8"}  # first hop is client-supplied
    assert (await gw.get("/p", headers=a)).status == 200
    assert (await gw.get("/p", headers=a)).status == 429
    assert (await gw.get("/p", headers=b)).status == 200
    assert (await gw.get("/p", headers={"X-Forwarded-For": "1.2.3.4, 203.0.113.8"})).status == 429


async def test_keys_expire(make_gateway: GatewayFactory, rdb: redis.Redis) -> None:
    gw = await limited(make_gateway, per="address", limit=5, window=10)
    await gw.get("/p")
    keys = await wait_for(lambda: rdb.keys("ratelimit:*"))
    assert 0 < rdb.pttl(keys[0]) <= 10_000  # type: ignore[operator]


async def test_client_chosen_request_ids_do_not_collapse_entries(
    make_gateway: GatewayFactory,
) -> None:
    gw = await limited(make_gateway, per="address", limit=5, window=60)
    same = {"X-Request-Id": "same-request-id-1"}
    results = await asyncio.gather(*(gw.get("/p", headers=same) for _ in range(10)))
    assert sorted(r.status for r in results) == [200] * 5 + [429] * 5


async def test_collecting_guest_cookies_does_not_multiply_the_limit(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    from ..conftest import BASE_ROUTES

    gw = await make_gateway(
        routes=[{"path": "/shop/", "upstream": "app", "guest": True}, *BASE_ROUTES],
        plugins=[{"rate_limit": {"per": "session", "limit": 3, "window": 60}}],
    )
    statuses = []
    for _ in range(3):
        # Each guest cookie is used once more after it was issued.
        gw.session.cookie_jar.clear()
        first = await gw.get("/shop/a")
        statuses.append(first.status)
        statuses.append((await gw.get("/shop/b")).status)
    assert statuses[:3] == [200, 200, 200]
    assert set(statuses[3:]) == {429}
