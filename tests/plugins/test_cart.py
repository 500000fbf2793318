"""The cart plugin through the whole gateway: real Redis, real upstream."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

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
    {
        "path": "/login",
        "upstream": "app",
        "session": "optional",
        "instructions": ["login", "set", "cart"],
    },
    {
        "path": "/",
        "upstream": "app",
        "session": "optional",
        "instructions": ["set", "logout", "cart"],
        "guest": True,
    },
]


async def cart_gateway(make_gateway: GatewayFactory, **opts: Any) -> TestClient:
    return await make_gateway(routes=ROUTES, plugins=[{"cart": opts}])


def counted(kind: str, outcome: str) -> float:
    v = REGISTRY.get_sample_value(
        "gateway_cart_instructions_total", {"kind": kind, "outcome": outcome}
    )
    return v or 0.0


async def send(
    client: TestClient, upstream: Upstream, path: str, *instructions: tuple[str, str]
) -> None:
    upstream.reply_headers(path, *instructions)
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()


async def cart_headers(client: TestClient, upstream: Upstream) -> tuple[str | None, str | None]:
    resp = await client.get("/look")
    assert resp.status == 200
    return upstream.last.header("X-Session-Cart-Items"), upstream.last.header(
        "X-Session-Cart-Total"
    )


def cart_of(rdb: redis.Redis, upstream: Upstream) -> dict[str, str]:
    sid = upstream.last.header("X-Session-Id")
    assert sid
    return rdb.hgetall(f"cart:{sid}")  # type: ignore[return-value]


async def test_add_matches_the_contract_layout(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await cart_gateway(make_gateway)
    # A visitor's very first request may already fill the cart (guest route).
    await send(gw, upstream, "/a", ("X-Session-Cart-Add", "sku=laptop-123; qty=2; price=999.99"))
    await send(gw, upstream, "/b", ("X-Session-Cart-Add", "sku=mouse-456; qty=1; price=29.99"))
    # 2 x 999.99 + 29.99 (the case study's sample prints 1029.97: one laptop's worth short)
    assert await cart_headers(gw, upstream) == ("3", "2029.97")
    assert cart_of(rdb, upstream) == {
        "item:laptop-123": "laptop-123|2|999.99",
        "item:mouse-456": "mouse-456|1|29.99",
        "total_items": "3",
        "total_value": "2029.97",
    }
    sid = upstream.last.header("X-Session-Id")
    assert 86000 < rdb.ttl(f"cart:{sid}") <= 86400  # type: ignore[operator]


async def test_new_visitor_gets_no_cart_then_an_empty_one(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await cart_gateway(make_gateway)
    # Without a session the backend hears of no cart at all; a new guest (created by the
    # backend's first instruction) has an empty one.
    assert await cart_headers(gw, upstream) == (None, None)
    upstream.reply_headers("/start", ("X-Session-Set", "seen=1"))
    resp = await gw.get("/start")
    assert resp.status == 200 and resp.cookies.get("sid") is not None
    upstream.reply_headers("/start")
    assert await cart_headers(gw, upstream) == ("0", "0.00")
    assert upstream.last.header("X-Session-Id")


async def test_money_is_exact(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await cart_gateway(make_gateway)
    await send(gw, upstream, "/a", ("X-Session-Cart-Add", "sku=a; qty=1; price=0.1"))
    await send(gw, upstream, "/b", ("X-Session-Cart-Add", "sku=b; qty=1; price=0.2"))
    assert await cart_headers(gw, upstream) == ("2", "0.30")
    assert cart_of(rdb, upstream)["item:a"] == "a|1|0.10"
    await send(gw, upstream, "/c", ("X-Session-Cart-Add", "sku=c; qty=3; price=999999999.99"))
    # 0.30 + 2999999999.97: a double would print 2999999999.9700003 or round.
    assert await cart_headers(gw, upstream) == ("5", "3000000000.27")


async def test_fifty_concurrent_changes_on_one_session_lose_nothing(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    # Fifty requests at once from one address: above the default per-address cap on
    # upstream connections (a limit this test is not about).
    gw = await make_gateway(
        routes=ROUTES, plugins=[{"cart": {}}], limits={"upstream_per_address": 64}
    )
    prices = ["0.10", "0.20", "19.99", "5", "1234.56"]

    async def add(request: web.Request) -> web.Response:
        i = int(request.query["i"])
        await asyncio.sleep(0.01 * (i % 3))  # interleave the answers
        resp = web.Response(text="ok")
        resp.headers["X-Session-Cart-Add"] = f"sku=s{i % 5}; qty={i % 4 + 1}; price={prices[i % 5]}"
        return resp

    upstream.routes["/add"] = add
    await start_guest(gw, upstream)
    await gw.get("/start")
    sid = upstream.last.header("X-Session-Id")
    await wait_for(lambda: rdb.exists(f"session:{sid}"))
    results = await asyncio.gather(*(gw.get(f"/add?i={i}") for i in range(50)))
    assert [r.status for r in results] == [200] * 50
    assert {r.cookies.get("sid") for r in results} == {None}  # all on the one session

    qty = {f"s{k}": sum(i % 4 + 1 for i in range(50) if i % 5 == k) for k in range(5)}
    total = sum(Decimal(prices[k]) * qty[f"s{k}"] for k in range(5))
    cart = rdb.hgetall(f"cart:{sid}")
    for k in range(5):
        assert cart[f"item:s{k}"] == f"s{k}|{qty[f's{k}']}|{Decimal(prices[k]):.2f}"
    assert cart["total_items"] == str(sum(qty.values()))
    assert cart["total_value"] == f"{total:.2f}"


@pytest.mark.parametrize(
    "value",
    [
        "sku=a; qty=1; price=1.999",
        "sku=a; qty=1; price=abc",
        "sku=a; qty=1; price=-1",
        "sku=a; qty=1; price=1e3",
        "sku=a; qty=1; price=1234567890",
        "sku=a; qty=0; price=1",
        "sku=a; qty=10000; price=1",
        "sku=a; qty=+2; price=1",
        "sku=bad sku; qty=1; price=1",
        "sku=" + "x" * 65 + "; qty=1; price=1",
        "qty=1; price=1",
        "sku=a; qty=1",
    ],
)
async def test_malformed_add_is_dropped_and_counted(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis, value: str
) -> None:
    gw = await cart_gateway(make_gateway)
    await send(gw, upstream, "/ok", ("X-Session-Cart-Add", "sku=keep; qty=1; price=2.50"))
    before = counted("add", "malformed")
    await send(gw, upstream, "/bad", ("X-Session-Cart-Add", value))
    assert counted("add", "malformed") == before + 1
    assert await cart_headers(gw, upstream) == ("1", "2.50")
    assert set(cart_of(rdb, upstream)) == {"item:keep", "total_items", "total_value"}


async def test_remove_decrement_and_clear(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await cart_gateway(make_gateway)
    await send(gw, upstream, "/a", ("X-Session-Cart-Add", "sku=a; qty=5; price=1.25"))
    await send(gw, upstream, "/b", ("X-Session-Cart-Add", "sku=b; qty=1; price=10"))
    await send(gw, upstream, "/r1", ("X-Session-Cart-Remove", "sku=a; qty=2"))
    assert await cart_headers(gw, upstream) == ("4", "13.75")
    await send(gw, upstream, "/r2", ("X-Session-Cart-Remove", "sku=a"))
    assert await cart_headers(gw, upstream) == ("1", "10.00")
    await send(gw, upstream, "/r3", ("X-Session-Cart-Remove", "sku=missing"))
    assert await cart_headers(gw, upstream) == ("1", "10.00")
    # One response may clear and refill: applied as clear, remove, add.
    await send(
        gw,
        upstream,
        "/c",
        ("X-Session-Cart-Add", "sku=c; qty=2; price=0.05"),
        ("X-Session-Cart-Clear", "1"),
    )
    assert await cart_headers(gw, upstream) == ("2", "0.10")


async def test_max_items_and_quantity_cap(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await cart_gateway(make_gateway, max_items=2)
    await send(gw, upstream, "/a", ("X-Session-Cart-Add", "sku=a; qty=9000; price=1"))
    await send(gw, upstream, "/b", ("X-Session-Cart-Add", "sku=b; qty=1; price=1"))
    full = counted("add", "cart-full")
    await send(gw, upstream, "/c", ("X-Session-Cart-Add", "sku=c; qty=1; price=1"))
    assert counted("add", "cart-full") == full + 1
    await send(gw, upstream, "/a2", ("X-Session-Cart-Add", "sku=a; qty=5000; price=1"))
    assert await cart_headers(gw, upstream) == ("10000", "10000.00")  # a capped at 9999


async def test_contents_header_is_bounded(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await cart_gateway(make_gateway, contents_header=True, max_contents_bytes=64)
    await send(gw, upstream, "/a", ("X-Session-Cart-Add", "sku=a; qty=1; price=1"))
    await gw.get("/look")
    assert upstream.last.header("X-Session-Cart-Contents") == "a|1|1.00"
    assert upstream.last.header("X-Session-Cart-Truncated") is None
    for i in range(8):
        await send(gw, upstream, f"/i{i}", ("X-Session-Cart-Add", f"sku=item-{i}; price=1"))
    await gw.get("/look")
    contents = upstream.last.header("X-Session-Cart-Contents")
    assert contents is not None and len(contents) <= 64
    assert contents.split(",")[:2] == ["a|1|1.00", "item-0|1|1.00"]
    assert upstream.last.header("X-Session-Cart-Truncated") == "true"


async def test_guest_cart_moves_to_the_new_session_at_login(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await cart_gateway(make_gateway)
    await send(gw, upstream, "/a", ("X-Session-Cart-Add", "sku=a; qty=2; price=3.50"))
    guest = upstream.last.header("X-Session-Id")
    await login(gw, upstream, "42")
    assert await cart_headers(gw, upstream) == ("2", "7.00")
    assert upstream.last.header("X-Session-Authenticated") == "true"
    assert not rdb.exists(f"cart:{guest}")
    assert rdb.hgetall("user_cart:42") == cart_of(rdb, upstream)


async def test_user_cart_returns_on_a_new_device_and_merges_with_the_guest_cart(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await cart_gateway(make_gateway)
    await login(gw, upstream, "42")
    await send(gw, upstream, "/u", ("X-Session-Cart-Add", "sku=u; qty=1; price=1.10"))
    await send(gw, upstream, "/v", ("X-Session-Cart-Add", "sku=v; qty=1; price=2"))
    await send(gw, upstream, "/bye", ("X-Session-Logout", "this"))

    gw.session.cookie_jar.clear()  # another device
    await send(gw, upstream, "/g", ("X-Session-Cart-Add", "sku=g; qty=1; price=5"))
    await send(gw, upstream, "/u2", ("X-Session-Cart-Add", "sku=u; qty=2; price=1.20"))
    await login(gw, upstream, "42")
    # u: 1 (saved) + 2 (guest) at the guest's newer price; v from the saved cart; g new.
    assert await cart_headers(gw, upstream) == ("5", "10.60")
    assert cart_of(rdb, upstream)["item:u"] == "u|3|1.20"

    # Logging in again as the same user keeps the cart as it is (no double counting).
    await login(gw, upstream, "42")
    assert await cart_headers(gw, upstream) == ("5", "10.60")

    # Another user logging in on this browser does not inherit user 42's cart.
    await login(gw, upstream, "43")
    assert await cart_headers(gw, upstream) == ("0", "0.00")
    assert rdb.hget("user_cart:42", "total_value") == "10.60"


async def test_without_persist_user_cart_a_new_device_starts_empty(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await cart_gateway(make_gateway, persist_user_cart=False)
    await login(gw, upstream, "42")
    await send(gw, upstream, "/u", ("X-Session-Cart-Add", "sku=u; qty=1; price=1"))
    gw.session.cookie_jar.clear()
    await login(gw, upstream, "42")
    assert await cart_headers(gw, upstream) == ("0", "0.00")
    assert not rdb.exists("user_cart:42")


async def test_clearing_an_authenticated_cart_clears_the_saved_copy(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await cart_gateway(make_gateway)
    await login(gw, upstream, "42")
    await send(gw, upstream, "/u", ("X-Session-Cart-Add", "sku=u; qty=1; price=1"))
    assert rdb.exists("user_cart:42")
    await send(gw, upstream, "/checkout", ("X-Session-Cart-Clear", "1"))
    assert not rdb.exists("user_cart:42")
    assert not rdb.exists(f"cart:{upstream.last.header('X-Session-Id')}")


async def test_redis_down_omits_the_headers_and_serves(
    make_gateway: GatewayFactory, upstream: Upstream, redis_server: RedisServer
) -> None:
    gw = await cart_gateway(make_gateway)
    await send(gw, upstream, "/a", ("X-Session-Cart-Add", "sku=a; qty=1; price=1"))
    redis_server.kill()
    resp = await gw.get("/look")
    assert resp.status == 200
    assert upstream.last.header("X-Session-Cart-Items") is None


async def test_config_is_validated(redis_server: RedisServer, upstream: Upstream) -> None:
    from gateway.chain import validate_plugins
    from gateway.config import ConfigError, parse_settings

    cfg = base_config(redis_server.url, upstream.url, plugins=["cart", {"cart": {}}])
    with pytest.raises(ConfigError, match=r"plugins\[1\]: cart is listed twice"):
        validate_plugins(parse_settings(cfg))
    cfg = base_config(redis_server.url, upstream.url, plugins=[{"cart": {"max_items": 0}}])
    with pytest.raises(ConfigError, match=r"^plugins\[0\]\.cart\.max_items: "):
        validate_plugins(parse_settings(cfg))


async def test_legacy_items_are_read_and_unreadable_ones_kept_aside(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    """A cart written by the legacy app in the case study's own format (`item:1`, `$`
    prices) is understood; a field no parser understands is kept, renamed, never lost."""
    gw = await cart_gateway(make_gateway)
    await send(gw, upstream, "/a", ("X-Session-Set", "seen=1"))  # a guest session
    await send(gw, upstream, "/a")
    sid = upstream.last.header("X-Session-Id")
    rdb.hset(
        f"cart:{sid}",
        mapping={
            "item:1": "laptop-123|2|$999.99",
            "item:2": "mouse-456|1|1,299.00",
            "total_items": "3",
            "total_value": "1029.97",
        },
    )
    await send(gw, upstream, "/b", ("X-Session-Cart-Add", "sku=pad-1; qty=1; price=5"))
    assert cart_of(rdb, upstream) == {
        "item:laptop-123": "laptop-123|2|999.99",
        "item:pad-1": "pad-1|1|5.00",
        "total_items": "3",
        "total_value": "2004.98",
        "unparsed:item:2": "mouse-456|1|1,299.00",
    }
    # Kept across later changes too.
    await send(gw, upstream, "/c", ("X-Session-Cart-Remove", "sku=pad-1"))
    assert cart_of(rdb, upstream)["unparsed:item:2"] == "mouse-456|1|1,299.00"
