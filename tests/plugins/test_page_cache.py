"""The page cache through the gateway: hits, misses, stampedes, what must not be cached."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient

from ..conftest import GatewayFactory, Upstream, login

ROUTES: list[dict[str, Any]] = [
    {"path": "/login", "upstream": "app", "session": "optional", "instructions": ["login"]},
    {"path": "/", "upstream": "app", "session": "optional", "guest": True},
]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def cache_gateway(make_gateway: GatewayFactory, **opts: Any) -> TestClient:
    opts.setdefault("paths", ["/products/"])
    return await make_gateway(routes=ROUTES, plugins=[{"page_cache": opts}])


def page(*headers: tuple[str, str], body: str = "", delay: float = 0.0) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if delay:
            await asyncio.sleep(delay)
        resp = web.Response(text=body or f"page {request.path_qs}")
        for k, v in headers:
            resp.headers[k] = v
        return resp

    return handler


def fetches(upstream: Upstream, path: str) -> int:
    return sum(1 for r in upstream.received if r.raw_path.split("?")[0] == path)


async def get(gw: TestClient, path: str, **kw: Any) -> tuple[int, str, str | None, Any]:
    resp = await gw.get(path, **kw)
    return resp.status, await resp.text(), resp.headers.get("X-Cache"), resp.headers


async def test_miss_then_hit(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    upstream.routes["/products/1"] = page(
        ("X-Shop", "yes"), ("Content-Type", "text/html"), body="<h1>one</h1>"
    )
    gw = await cache_gateway(make_gateway)
    s1, b1, c1, h1 = await get(gw, "/products/1")
    s2, b2, c2, h2 = await get(gw, "/products/1")
    assert (s1, c1, s2, c2) == (200, "MISS", 200, "HIT")
    assert b1 == b2 == "<h1>one</h1>"
    assert h2["X-Shop"] == "yes" and h2["Content-Type"].startswith("text/html")
    assert 0 <= int(h2["Age"]) <= 60  # the default ttl: the copy is younger than that
    assert h2["X-Request-Id"] != h1["X-Request-Id"]  # per request, never from the cache
    assert fetches(upstream, "/products/1") == 1
    # Query strings are part of the key; other paths are not cached at all.
    assert (await get(gw, "/products/1?color=red"))[2] == "MISS"
    assert (await get(gw, "/other"))[2] is None


async def test_head_is_served_from_the_get_entry(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await cache_gateway(make_gateway)
    await get(gw, "/products/h")
    resp = await gw.head("/products/h")
    assert resp.status == 200 and resp.headers["X-Cache"] == "HIT"
    assert fetches(upstream, "/products/h") == 1


async def test_stampede_makes_one_upstream_fetch(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    upstream.routes["/products/hot"] = page(body="hot item", delay=0.2)
    gw = await cache_gateway(make_gateway)
    results = await asyncio.gather(*(get(gw, "/products/hot") for _ in range(50)))
    assert fetches(upstream, "/products/hot") == 1
    assert {(s, b) for s, b, _, _ in results} == {(200, "hot item")}
    assert sorted(c or "" for _, _, c, _ in results) == ["HIT"] * 49 + ["MISS"]


async def test_followers_go_upstream_when_the_leader_cannot_be_cached(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    upstream.routes["/products/p"] = page(("Cache-Control", "private"), delay=0.1)
    gw = await cache_gateway(make_gateway)
    results = await asyncio.gather(*(get(gw, "/products/p") for _ in range(5)))
    assert {(s, c) for s, _, c, _ in results} == {(200, "MISS")}
    assert fetches(upstream, "/products/p") == 5


@pytest.mark.parametrize(
    "headers",
    [
        [("Set-Cookie", "tracking=1; Path=/")],
        [("Cache-Control", "private, max-age=60")],
        [("Cache-Control", "no-store")],
        [("Cache-Control", "no-cache")],
        [("Cache-Control", "max-age=0")],
        [("Vary", "*")],
    ],
)
async def test_not_cached(
    make_gateway: GatewayFactory,
    upstream: Upstream,
    rdb: redis.Redis,
    headers: list[tuple[str, str]],
) -> None:
    upstream.routes["/products/x"] = page(*headers)
    gw = await cache_gateway(make_gateway)
    assert [(await get(gw, "/products/x"))[2] for _ in range(2)] == ["MISS", "MISS"]
    assert fetches(upstream, "/products/x") == 2
    assert rdb.keys("pagecache:*") == []


async def test_errors_and_big_bodies_are_not_cached(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    async def gone(request: web.Request) -> web.Response:
        return web.Response(status=404, text="gone")

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)  # no Content-Length: the size is found while streaming
        for _ in range(4):
            await resp.write(b"x" * 400)
        await resp.write_eof()
        return resp

    upstream.routes["/products/gone"] = gone
    upstream.routes["/products/big"] = page(body="y" * 2000)
    upstream.routes["/products/stream"] = chunked
    gw = await cache_gateway(make_gateway, max_body_bytes=1000)
    for path in ("/products/gone", "/products/big", "/products/stream"):
        first = await gw.get(path)
        body = await first.read()
        assert (await gw.get(path)).headers["X-Cache"] == "MISS"
        assert fetches(upstream, path) == 2
    assert body == b"x" * 1600  # the client still got the whole body


async def test_authenticated_sessions_bypass_unless_configured(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await cache_gateway(make_gateway)
    await get(gw, "/products/a")  # cached by a guest
    await login(gw, upstream, "5")
    assert [(await get(gw, "/products/a"))[2] for _ in range(2)] == ["MISS", "MISS"]
    assert [(await get(gw, "/products/b"))[2] for _ in range(2)] == ["MISS", "MISS"]
    assert fetches(upstream, "/products/a") == 3


async def test_cache_authenticated(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await cache_gateway(make_gateway, cache_authenticated=True)
    await login(gw, upstream, "5")
    assert [(await get(gw, "/products/a"))[2] for _ in range(2)] == ["MISS", "HIT"]


async def test_a_hit_carries_only_this_visitors_cookie_decision(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    import secrets

    gw = await cache_gateway(make_gateway)
    first = await gw.get("/products/c")
    assert first.headers["X-Cache"] == "MISS"
    assert "Set-Cookie" not in first.headers  # anonymous: no guest until one is needed
    hit = await gw.get("/products/c")
    assert hit.headers["X-Cache"] == "HIT"
    assert "Set-Cookie" not in hit.headers
    # A visitor with a stale cookie gets the hit plus its own cookie's expiry, nothing else.
    gw.session.cookie_jar.clear()
    stale = await gw.get("/products/c", headers={"Cookie": f"sid={secrets.token_urlsafe(32)}"})
    assert stale.headers["X-Cache"] == "HIT"
    cookies = stale.headers.getall("Set-Cookie")
    assert len(cookies) == 1 and cookies[0].startswith("sid=;") and "Max-Age=0" in cookies[0]


async def test_vary(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    async def by_language(request: web.Request) -> web.Response:
        lang = request.headers.get("Accept-Language", "none")
        return web.Response(text=f"in {lang}", headers={"Vary": "Accept-Language"})

    upstream.routes["/products/v"] = by_language
    gw = await cache_gateway(make_gateway)
    en, de = {"Accept-Language": "en"}, {"Accept-Language": "de"}
    assert (await get(gw, "/products/v", headers=en))[1:3] == ("in en", "MISS")
    assert (await get(gw, "/products/v", headers=de))[1:3] == ("in de", "MISS")
    assert (await get(gw, "/products/v", headers=en))[1:3] == ("in en", "HIT")
    assert (await get(gw, "/products/v", headers=de))[1:3] == ("in de", "HIT")
    assert (await get(gw, "/products/v"))[1:3] == ("in none", "MISS")
    assert fetches(upstream, "/products/v") == 3


async def test_vary_followers_check_their_variant(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.1)
        lang = request.headers.get("Accept-Language", "none")
        return web.Response(text=f"in {lang}", headers={"Vary": "Accept-Language"})

    upstream.routes["/products/w"] = slow
    gw = await cache_gateway(make_gateway)
    results = await asyncio.gather(
        get(gw, "/products/w", headers={"Accept-Language": "en"}),
        get(gw, "/products/w", headers={"Accept-Language": "de"}),
    )
    assert [b for _, b, _, _ in results] == ["in en", "in de"]


async def test_ttl_from_max_age_and_config(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    upstream.routes["/products/m"] = page(("Cache-Control", "public, max-age=30"))
    upstream.routes["/products/s"] = page(("Cache-Control", "max-age=30, s-maxage=7"))
    upstream.routes["/products/l"] = page(("Cache-Control", "max-age=999999"))
    gw = await cache_gateway(make_gateway, ttl=120, max_ttl=600)
    ttls = {}
    for p in ("/products/m", "/products/s", "/products/l", "/products/n"):
        before = set(rdb.keys("pagecache:*"))
        await get(gw, p)
        assert (await get(gw, p))[2] == "HIT"
        (key,) = [k for k in set(rdb.keys("pagecache:*")) - before if ":vary:" not in k]
        ttls[p] = rdb.ttl(key)
    assert 25 < ttls["/products/m"] <= 30
    assert 2 < ttls["/products/s"] <= 7
    assert 595 < ttls["/products/l"] <= 600
    assert 115 < ttls["/products/n"] <= 120


async def test_only_top_items(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    rdb.zadd("viewed:ranking", {"best": 100, "good": 50, "meh": 1})
    gw = await cache_gateway(make_gateway, only_top=2)
    for item, want in (("best", "HIT"), ("good", "HIT"), ("meh", "MISS"), ("new", "MISS")):
        await get(gw, f"/products/{item}")
        assert (await get(gw, f"/products/{item}"))[2] == want, item


async def test_redis_down_passes_through(
    make_gateway: GatewayFactory, upstream: Upstream, redis_server: Any
) -> None:
    gw = await make_gateway(
        routes=[{"path": "/", "upstream": "app", "session": "none"}],
        plugins=[{"page_cache": {"paths": ["/products/"]}}],
    )
    redis_server.kill()
    results = [await get(gw, "/products/z") for _ in range(2)]
    assert [(s, c) for s, _, c, _ in results] == [(200, "MISS"), (200, "MISS")]


async def test_waiting_misses_are_released_when_the_leader_fails(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    calls = 0

    async def flaky(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        if calls <= 2:  # the leader's upstream dies before answering (and on the
            assert request.transport is not None  # client's one automatic retry)
            request.transport.close()
        return web.Response(text="ok", headers={"Cache-Control": "private"})

    upstream.routes["/products/f"] = flaky
    gw = await cache_gateway(make_gateway, wait_timeout=30)
    started = asyncio.get_running_loop().time()
    results = await asyncio.gather(*(get(gw, "/products/f") for _ in range(5)))
    assert sorted(s for s, _, _, _ in results) == [200, 200, 200, 200, 502]
    assert asyncio.get_running_loop().time() - started < 5  # not the 30 s wait_timeout


@pytest.mark.parametrize(
    "vary", ["Cookie", "Authorization", "X-Session-Authenticated", "accept, cookie"]
)
async def test_vary_on_credentials_or_gateway_headers_is_never_cached(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis, vary: str
) -> None:
    gw = await cache_gateway(make_gateway)
    upstream.routes["/products/v"] = page(("Vary", vary))
    token = "A" * 43
    for _ in range(2):
        _, _, xcache, _ = await get(gw, "/products/v", headers={"Cookie": f"sid={token}"})
        assert xcache == "MISS"
    assert fetches(upstream, "/products/v") == 2
    # Nothing in Redis holds the client's cookie value.
    for key in rdb.scan_iter("*"):
        if rdb.type(key) == "string":
            assert token not in (rdb.get(key) or "")


@pytest.mark.parametrize(
    ("cache_control", "ttl"),
    [
        # Browsers revalidate every time, the gateway keeps it 30 s.
        ("public, max-age=0, s-maxage=30", 30),
        ("max-age=0, must-revalidate, s-maxage=30", 30),
        ("s-maxage=30", 30),
        ("max-age=30, s-maxage=0", None),  # browsers may keep it; shared caches must not
        ("no-cache, s-maxage=30", None),  # no-cache binds shared caches too
        ("private, s-maxage=30", None),
        ("no-store, s-maxage=30", None),
        ("max-age=30, s-maxage=soon", None),
    ],
)
async def test_s_maxage_is_the_shared_caches_own_freshness(
    make_gateway: GatewayFactory,
    upstream: Upstream,
    rdb: redis.Redis,
    cache_control: str,
    ttl: int | None,
) -> None:
    upstream.routes["/products/s"] = page(("Cache-Control", cache_control))
    gw = await cache_gateway(make_gateway, ttl=120)
    await get(gw, "/products/s")
    _, _, x_cache, headers = await get(gw, "/products/s")
    stored = [k for k in rdb.keys("pagecache:*") if ":vary:" not in k]
    if ttl is None:
        assert (x_cache, stored) == ("MISS", [])
        return
    assert x_cache == "HIT"
    assert ttl - 5 < rdb.ttl(stored[0]) <= ttl
    # The browser gets the backend's directives as they were: it revalidates, so every
    # view reaches the gateway (and is counted).
    assert headers["Cache-Control"] == cache_control


async def test_report_tells_the_backend_what_the_cache_did_for_the_session(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    upstream.routes["/products/r"] = page(("Cache-Control", "public, max-age=0, s-maxage=30"))
    upstream.reply_headers("/start", ("X-Session-Set", "seen=1"))
    routes = [dict(r, instructions=["login", "set", "logout"]) for r in ROUTES]
    gw = await make_gateway(routes=routes, plugins=[{"page_cache": {"report": True}}])
    await gw.get("/start")  # a guest session

    async def told() -> dict[str, str]:
        await gw.get("/look")
        value = upstream.last.header("X-Session-Page-Cache")
        return dict(p.split("=", 1) for p in value.split(";")) if value else {}

    assert await told() == {}
    assert (await get(gw, "/products/r"))[2] == "MISS"
    report = await told()
    assert (report["outcome"], report["path"]) == ("miss", "/products/r")
    assert float(report["at"]) > time.time() - 10
    assert (await get(gw, "/products/r"))[2] == "HIT"
    report = await told()
    assert (report["outcome"], report["age"]) == ("hit", "0")
    # Logged in, the cache steps aside; the report says so.
    await login(gw, upstream, "7")
    assert (await get(gw, "/products/r"))[2] == "MISS"
    assert (await told())["outcome"] == "bypass-logged-in"
    sid = upstream.last.header("X-Session-Id")
    assert 0 < rdb.ttl(f"pagecache_last:{sid}") <= 600  # the session's idle TTL
    # The report goes with its session.
    upstream.reply_headers("/bye", ("X-Session-Logout", "this"))
    await gw.get("/bye")
    assert not rdb.exists(f"pagecache_last:{sid}")


async def test_no_report_unless_asked(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    upstream.reply_headers("/start", ("X-Session-Set", "seen=1"))
    routes = [dict(r, instructions=["login", "set"]) for r in ROUTES]
    gw = await make_gateway(routes=routes, plugins=[{"page_cache": {}}])
    await gw.get("/start")
    await get(gw, "/products/r")
    await get(gw, "/products/r")
    await gw.get("/look")
    assert upstream.last.header("X-Session-Id")
    assert upstream.last.header("X-Session-Page-Cache") is None
