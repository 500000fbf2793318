"""The cart plugin through the whole gateway: real Redis, real upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import aiohttp
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


class Device:
    """Another browser on the same gateway: its own cookie jar."""

    def __init__(self, gw: TestClient, upstream: Upstream) -> None:
        self.gw, self.upstream = gw, upstream
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def get(self, path: str) -> aiohttp.ClientResponse:
        async with self.http.get(self.gw.make_url(path)) as resp:
            await resp.read()
            return resp

    async def login(self, user_id: str) -> None:
        self.upstream.reply_headers("/login", ("X-Session-Login", f"user_id={user_id}"))
        async with self.http.post(self.gw.make_url("/login")) as resp:
            assert resp.status == 200

    async def send(self, path: str, *instructions: tuple[str, str]) -> None:
        self.upstream.reply_headers(path, *instructions)
        assert (await self.get(path)).status == 200

    async def look(self) -> dict[str, str | None]:
        """The cart headers the backend receives for this device's next request."""
        await self.get("/look")
        last = self.upstream.last
        names = ("Items", "Total", "Merged")
        return {n: last.header(f"X-Session-Cart-{n}") for n in names}

    async def close(self) -> None:
        await self.http.close()


@pytest.fixture
async def devices(upstream: Upstream) -> AsyncIterator[Callable[[TestClient], Device]]:
    made: list[Device] = []

    def make(gw: TestClient) -> Device:
        made.append(Device(gw, upstream))
        return made[-1]

    yield make
    for d in made:
        await d.close()


async def test_guest_cart_merges_into_the_users_cart_at_login(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await cart_gateway(make_gateway)
    await send(gw, upstream, "/a", ("X-Session-Cart-Add", "sku=a; qty=2; price=3.50"))
    guest = upstream.last.header("X-Session-Id")
    await login(gw, upstream, "42")
    assert await cart_headers(gw, upstream) == ("2", "7.00")
    assert upstream.last.header("X-Session-Authenticated") == "true"
    # Nothing was waiting in the user's cart: nothing to report.
    assert upstream.last.header("X-Session-Cart-Merged") is None
    assert not rdb.exists(f"cart:{guest}")
    sid = upstream.last.header("X-Session-Id")
    assert not rdb.exists(f"cart:{sid}")
    assert rdb.hgetall("user_cart:42") == {
        "item:a": "a|2|3.50",
        "total_items": "2",
        "total_value": "7.00",
    }


async def test_one_cart_shared_by_every_session_of_a_user_and_the_merge_reported_once(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis, devices: Any
) -> None:
    gw = await cart_gateway(make_gateway)
    phone, laptop = devices(gw), devices(gw)
    await phone.login("42")
    await phone.send("/u", ("X-Session-Cart-Add", "sku=u; qty=1; price=1.10"))
    await phone.send("/v", ("X-Session-Cart-Add", "sku=v; qty=1; price=2"))

    # The laptop fills a guest cart, then logs in as the same user while the phone's
    # session is still alive.
    await laptop.send("/g", ("X-Session-Cart-Add", "sku=g; qty=1; price=5"))
    await laptop.send("/u2", ("X-Session-Cart-Add", "sku=u; qty=2; price=1.20"))
    await laptop.login("42")
    # u: 1 (saved) + 2 (guest) at the guest's newer price; v from the saved cart; g new.
    # The first request after the login hears what the merge did; the next one does not.
    merged = "saved_items=2;guest_items=3;total_items=5"
    assert await laptop.look() == {"Items": "5", "Total": "10.60", "Merged": merged}
    assert await laptop.look() == {"Items": "5", "Total": "10.60", "Merged": None}
    assert rdb.hget("user_cart:42", "item:u") == "u|3|1.20"

    # The phone sees the same cart, and a change on either is seen by both.
    assert await phone.look() == {"Items": "5", "Total": "10.60", "Merged": None}
    await phone.send("/r", ("X-Session-Cart-Remove", "sku=v"))
    assert (await laptop.look())["Total"] == "8.60"

    # Logging in again as the same user keeps the cart as it is: no double counting, no
    # report. Another user on that browser does not inherit user 42's cart. A cart:<id>
    # of a signed-in session (from before per-user carts) goes with its session.
    await laptop.get("/look")
    old_sid = upstream.last.header("X-Session-Id")
    rdb.hset(f"cart:{old_sid}", mapping={"item:old": "old|1|1.00"})
    await laptop.login("42")
    assert not rdb.exists(f"cart:{old_sid}")
    assert await laptop.look() == {"Items": "4", "Total": "8.60", "Merged": None}
    await laptop.login("43")
    assert await laptop.look() == {"Items": "0", "Total": "0.00", "Merged": None}
    assert rdb.hget("user_cart:42", "total_value") == "8.60"


async def test_two_sessions_of_one_user_adding_at_once_lose_nothing(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis, devices: Any
) -> None:
    gw = await make_gateway(
        routes=ROUTES, plugins=[{"cart": {}}], limits={"upstream_per_address": 64}
    )

    async def add(request: web.Request) -> web.Response:
        i = int(request.query["i"])
        await asyncio.sleep(0.01 * (i % 3))  # interleave the answers
        resp = web.Response(text="ok")
        resp.headers["X-Session-Cart-Add"] = f"sku=s{i % 4}; qty={i % 3 + 1}; price=1.25"
        return resp

    upstream.routes["/add"] = add
    one, two = devices(gw), devices(gw)
    await one.login("42")
    await two.login("42")
    n = 30
    results = await asyncio.gather(
        *(d.get(f"/add?i={i}") for i in range(n) for d in (one, two))
    )
    assert [r.status for r in results] == [200] * 2 * n
    qty = {f"s{k}": 2 * sum(i % 3 + 1 for i in range(n) if i % 4 == k) for k in range(4)}
    cart = rdb.hgetall("user_cart:42")
    for k in range(4):
        assert cart[f"item:s{k}"] == f"s{k}|{qty[f's{k}']}|1.25"
    total = sum(qty.values())
    assert cart["total_items"] == str(total)
    assert cart["total_value"] == f"{Decimal('1.25') * total:.2f}"
    assert (await one.look())["Items"] == (await two.look())["Items"] == str(total)


async def test_the_users_cart_comes_back_at_the_next_login_with_a_word_about_it(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await cart_gateway(make_gateway)
    await login(gw, upstream, "42")
    await send(gw, upstream, "/u", ("X-Session-Cart-Add", "sku=u; qty=2; price=1"))
    await send(gw, upstream, "/bye", ("X-Session-Logout", "this"))
    assert rdb.exists("user_cart:42")

    gw.session.cookie_jar.clear()  # another device, later
    await login(gw, upstream, "42")
    await gw.get("/look")
    assert upstream.last.header("X-Session-Cart-Items") == "2"
    assert upstream.last.header("X-Session-Cart-Merged") == (
        "saved_items=2;guest_items=0;total_items=2"
    )
    sid = upstream.last.header("X-Session-Id")
    assert not rdb.exists(f"cart_merged:{sid}")


async def test_the_users_cart_outlives_every_session_that_shares_it(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    # persist_user_cart (default): kept user_cart_ttl after its last change.
    gw = await cart_gateway(make_gateway, user_cart_ttl=7 * 86400)
    await login(gw, upstream, "42")
    await send(gw, upstream, "/u", ("X-Session-Cart-Add", "sku=u; qty=1; price=1"))
    assert 7 * 86400 - 5 < rdb.ttl("user_cart:42") <= 7 * 86400
    # A TTL is never shortened by a change (set by hand here: a longer one).
    rdb.expire("user_cart:42", 9 * 86400)
    await send(gw, upstream, "/u", ("X-Session-Cart-Add", "sku=u; qty=1; price=1"))
    assert rdb.ttl("user_cart:42") > 8 * 86400


async def test_without_persist_user_cart_the_cart_ends_with_the_users_sessions(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await cart_gateway(make_gateway, persist_user_cart=False, user_cart_ttl=60)
    await login(gw, upstream, "42")
    await send(gw, upstream, "/u", ("X-Session-Cart-Add", "sku=u; qty=1; price=1"))
    absolute = 3600  # base_config's session.absolute_ttl: as long as a session can live
    assert absolute - 5 < rdb.ttl("user_cart:42") <= absolute
    # Cut short by hand: the next login extends it to cover the new session.
    rdb.expire("user_cart:42", 30)
    gw.session.cookie_jar.clear()
    await login(gw, upstream, "42")
    assert absolute - 5 < rdb.ttl("user_cart:42") <= absolute


async def test_clearing_the_users_cart_clears_it_for_every_session(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis, devices: Any
) -> None:
    gw = await cart_gateway(make_gateway)
    one, two = devices(gw), devices(gw)
    await one.login("42")
    await two.login("42")
    await one.send("/u", ("X-Session-Cart-Add", "sku=u; qty=1; price=1"))
    assert rdb.exists("user_cart:42")
    await two.send("/checkout", ("X-Session-Cart-Clear", "1"))
    assert not rdb.exists("user_cart:42")
    assert (await one.look())["Items"] == "0"


async def test_a_change_for_a_guest_session_that_is_gone_is_dropped(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await cart_gateway(make_gateway)
    await send(gw, upstream, "/a", ("X-Session-Cart-Add", "sku=a; qty=1; price=1"))
    await gw.get("/look")
    sid = upstream.last.header("X-Session-Id")

    async def slow_add(request: web.Request) -> web.Response:
        # The session ends while the backend works on the request.
        rdb.delete(f"session:{sid}")
        return web.Response(text="ok", headers={"X-Session-Cart-Add": "sku=b; qty=1; price=1"})

    upstream.routes["/b"] = slow_add
    before = counted("add", "no-session")
    await gw.get("/b")
    assert counted("add", "no-session") == before + 1
    assert rdb.hget(f"cart:{sid}", "item:b") is None


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
