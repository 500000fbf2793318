"""The Fake Web Retailer alone (no gateway): both modes, real aiohttp servers, real DBs."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from examples.fake_web_retailer import make_app
from examples.fake_web_retailer.db import Database
from examples.fake_web_retailer.sessions import LEGACY_COOKIE
from examples.fake_web_retailer.views import STATE

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]



def instruction(value: str) -> dict[str, str]:
    """Parse ``k=v; k2=v2`` (percent-encoded values) as the gateway will."""
    out = {}
    for part in value.split(";"):
        key, _, val = part.strip().partition("=")
        out[key] = unquote(val)
    return out


def db_of(client: Client) -> Database:
    return client.app[STATE].db


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:{tmp_path / 'shop.sqlite3'}"


@pytest.fixture
async def gateway_shop(aiohttp_client: MakeClient, sqlite_url: str) -> Client:
    return await aiohttp_client(make_app("gateway", sqlite_url))


@pytest.fixture
def postgres_url(pg_dsn: str) -> str:
    """A fresh database on the tests' private PostgreSQL (tests/postgres.py), never the
    machine's own."""
    return pg_dsn


def no_session_cookie(resp: Any) -> bool:
    """The shop may keep its flash message and last action in cookies of its own
    (flash.py); never a session."""
    names = {c.split("=", 1)[0] for c in resp.headers.getall("Set-Cookie", ())}
    return names <= {"fwr_flash", "fwr_last_action"}


def gw_headers(**fields: str) -> dict[str, str]:
    """Request headers as the gateway sends them for an authenticated session."""
    headers = {"X-Session-Authenticated": "true", "X-Session-Id": "f" * 64}
    for name, value in fields.items():
        headers["X-Session-" + name.replace("_", "-").title()] = value
    return headers


# ================================================================ gateway mode
async def test_gateway_login_right_password_answers_with_login_instruction(
    gateway_shop: Client,
) -> None:
    resp = await gateway_shop.post(
        "/login",
        data={"username": "alice", "password": "alice-password", "next": "/cart"},
        allow_redirects=False,
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/cart"
    login = instruction(resp.headers["X-Session-Login"])
    assert login == {"user_id": "1001", "username": "alice", "email": "alice@example.com"}
    assert "%40" in resp.headers["X-Session-Login"], "values must be percent-encoded"
    assert no_session_cookie(resp), "gateway mode sets no session cookie of its own"


@pytest.mark.parametrize(
    ("username", "password"),
    [("alice", "wrong"), ("alice", ""), ("nobody", "alice-password"), ("bob", "alice-password")],
)
async def test_gateway_login_wrong_credentials_sends_no_instruction(
    gateway_shop: Client, username: str, password: str
) -> None:
    resp = await gateway_shop.post(
        "/login", data={"username": username, "password": password}, allow_redirects=False
    )
    assert resp.status == 401
    assert "X-Session-Login" not in resp.headers
    assert "Wrong username or password" in await resp.text()


@pytest.mark.parametrize(
    "next_path",
    [
        "//evil.example/",
        "https://evil.example/",
        "/\\evil.example",
        "javascript:alert(1)",
        "/ok\r\nSet-Cookie: x=1",
        "",
    ],
)
async def test_login_redirects_only_to_same_site_paths(
    gateway_shop: Client, next_path: str
) -> None:
    resp = await gateway_shop.post(
        "/login",
        data={"username": "bob", "password": "bob-password", "next": next_path},
        allow_redirects=False,
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/account"


async def test_non_ascii_user_login_is_percent_encoded(gateway_shop: Client) -> None:
    resp = await gateway_shop.post(
        "/login", data={"username": "zoë", "password": "zoe-password"}, allow_redirects=False
    )
    raw = resp.headers["X-Session-Login"]
    assert raw.isascii()
    assert instruction(raw) == {
        "user_id": "1004",
        "username": "zoë",
        "email": "zoe+shop@example.com",
    }


async def test_gateway_account_page_shows_header_fields(gateway_shop: Client) -> None:
    headers = gw_headers(
        user_id="12345",
        username="j%C3%B6hn_doe",  # percent-encoded UTF-8: "jöhn_doe"
        email="john%40example.com",
        page_views="15",
        login_time="1673120000.123",
        current_page="%2Fproducts%2Flaptop-123",
        page_theme="%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    )
    resp = await gateway_shop.get("/account", headers=headers, allow_redirects=False)
    assert resp.status == 200
    html = await resp.text()
    assert '<strong id="username">jöhn_doe</strong>' in html
    # Times as a person reads them, not epoch numbers.
    login_clock = time.strftime("%H:%M:%S UTC", time.gmtime(1673120000.123))
    for shown in ("john@example.com", login_clock, "/products/laptop-123", "page_views"):
        assert shown in html
    assert "1673120000" not in html and " ago (" in html
    assert "<th>page_views</th><td>15</td>" in html
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)" in html


async def test_gateway_account_requires_login(gateway_shop: Client) -> None:
    for headers in ({}, {"X-Session-Authenticated": "false", "X-Session-Id": "abc"}):
        resp = await gateway_shop.get("/account", headers=headers, allow_redirects=False)
        assert resp.status == 303
        assert resp.headers["Location"] == "/login?next=%2Faccount"


async def test_gateway_cart_instructions(gateway_shop: Client) -> None:
    resp = await gateway_shop.post(
        "/cart/add",
        data={"sku": "laptop-123", "qty": "2", "price": "0.01"},  # price is not trusted
        allow_redirects=False,
    )
    assert resp.status == 303 and resp.headers["Location"] == "/cart"
    assert instruction(resp.headers["X-Session-Cart-Add"]) == {
        "sku": "laptop-123",
        "qty": "2",
        "price": "999.99",
    }

    resp = await gateway_shop.post("/cart/remove", data={"sku": "mouse-456"}, allow_redirects=False)
    assert resp.headers["X-Session-Cart-Remove"] == "sku=mouse-456"
    resp = await gateway_shop.post("/cart/clear", allow_redirects=False)
    assert resp.headers["X-Session-Cart-Clear"] == "1"

    for data, status in (
        ({"sku": "no-such-sku"}, 404),
        ({"sku": "mouse-456", "qty": "0"}, 400),
        ({"sku": "mouse-456", "qty": "lots"}, 400),
    ):
        resp = await gateway_shop.post("/cart/add", data=data, allow_redirects=False)
        assert resp.status == status
        assert "X-Session-Cart-Add" not in resp.headers


async def test_gateway_cart_page_renders_from_headers(gateway_shop: Client) -> None:
    contents = "laptop-123%7C2%7C999.99,mouse-456%7C1%7C29.99"  # fully percent-encoded
    resp = await gateway_shop.get(
        "/cart",
        headers={
            "X-Session-Cart-Contents": contents,
            "X-Session-Cart-Items": "3",
            "X-Session-Cart-Total": "2029.97",
        },
    )
    html = await resp.text()
    assert "UltraBook 14" in html and "Silent Mouse" in html
    assert "3 item(s), total <strong>$2,029.97</strong>" in html

    resp = await gateway_shop.get(
        "/cart", headers={"X-Session-Cart-Items": "5", "X-Session-Cart-Total": "149.95"}
    )
    assert "5 item(s), total <strong>$149.95</strong>" in await resp.text()

    resp = await gateway_shop.get("/cart")
    assert "cart plugin" in await resp.text()


async def test_gateway_logout_instruction(gateway_shop: Client) -> None:
    resp = await gateway_shop.post(
        "/logout", headers=gw_headers(user_id="1001"), allow_redirects=False
    )
    assert resp.status == 303 and resp.headers["X-Session-Logout"] == "this"
    resp = await gateway_shop.post("/logout", data={"scope": "all"}, allow_redirects=False)
    assert resp.headers["X-Session-Logout"] == "all"


async def test_gateway_mode_makes_no_session_writes(gateway_shop: Client) -> None:
    auth = gw_headers(user_id="1001", username="alice", email="alice%40example.com")
    steps: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/", {}),
        ("GET", "/products", {}),
        ("GET", "/products/laptop-123", {}),
        ("POST", "/cart/add", {"data": {"sku": "laptop-123", "qty": "1"}}),
        ("GET", "/cart", {}),
        ("POST", "/login", {"data": {"username": "alice", "password": "alice-password"}}),
        ("GET", "/account", {"headers": auth}),
        ("GET", "/debug/headers", {"headers": auth}),
        ("POST", "/logout", {"headers": auth}),
    ]
    for method, path, kwargs in steps:
        resp = await gateway_shop.request(method, path, allow_redirects=False, **kwargs)
        assert resp.status in (200, 303), (method, path, resp.status)
        assert no_session_cookie(resp), (method, path)
    db = db_of(gateway_shop)
    assert db.session_writes == 0
    assert await db.count_sessions() == 0


async def test_debug_headers_echoes_decoded_session_headers(gateway_shop: Client) -> None:
    resp = await gateway_shop.get(
        "/debug/headers",
        headers={
            **gw_headers(username="z%C3%B6e"),
            "X-Session-Cart-Items": "2",
            "X-Forwarded-For": "10.0.0.1",
        },
    )
    body = await resp.json()
    assert body["mode"] == "gateway"
    assert body["headers"]["X-Session-Username"] == "zöe"
    assert "X-Forwarded-For" not in body["headers"]
    assert body["authenticated"] is True and body["session_id"] == "f" * 64
    assert body["fields"]["username"] == "zöe"
    assert body["cart"]["total_items"] == 2


async def test_healthz(gateway_shop: Client) -> None:
    resp = await gateway_shop.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok", "mode": "gateway"}


async def test_pages_render(gateway_shop: Client) -> None:
    resp = await gateway_shop.get("/products")
    html = await resp.text()
    assert html.count('<li><a href="/products/') == 20
    resp = await gateway_shop.get("/products/monitor-300")
    assert resp.status == 200 and "27in 4K Monitor" in await resp.text()
    resp = await gateway_shop.get("/products/nope")
    assert resp.status == 404


def cache_control(resp: Any) -> set[str]:
    return {part.strip().lower() for part in resp.headers.get("Cache-Control", "").split(",")}


async def test_gateway_product_pages_are_public_and_the_same_for_every_guest(
    gateway_shop: Client,
) -> None:
    """The gateway's page cache may share product pages: nothing of the session in them.
    Browsers revalidate every time (so every view reaches the gateway); the gateway may
    keep them 30 s."""
    visitors = {
        "no session": {},
        "guest with a cart": {
            "X-Session-Id": "a" * 64,
            "X-Session-Authenticated": "false",
            "X-Session-Cart-Items": "3",
            "X-Session-Cart-Total": "2029.97",
            "X-Session-Cart-Contents": "laptop-123%7C2%7C999.99,mouse-456%7C1%7C29.99",
        },
    }
    bodies = {}
    for who, headers in visitors.items():
        resp = await gateway_shop.get("/products/laptop-123", headers=headers)
        assert resp.status == 200, who
        assert cache_control(resp) == {"public", "max-age=0", "s-maxage=30"}, who
        assert "Set-Cookie" not in resp.headers and "Vary" not in resp.headers, who
        html = await resp.text()
        assert "UltraBook 14" in html and 'action="/cart/add"' in html, who
        assert '<a href="/cart">Cart</a>' in html and "Cart (" not in html, who
        assert "alice" not in html and "Log out" not in html, who
        assert '<a href="/account">Account</a>' in html, who
        bodies[who] = html
    assert len(set(bodies.values())) == 1, "the product page depends on the session"

    # The add-to-cart form posts to a page that is never cached.
    resp = await gateway_shop.post("/cart/add", data={"sku": "laptop-123"}, allow_redirects=False)
    assert {"private", "no-store"} <= cache_control(resp)


async def test_gateway_product_pages_show_a_logged_in_user_and_stay_private(
    gateway_shop: Client,
) -> None:
    headers = {
        **gw_headers(user_id="1001", username="alice", email="alice%40example.com"),
        "X-Session-Cart-Items": "3",
        "X-Session-Cart-Total": "2029.97",
    }
    resp = await gateway_shop.get("/products/laptop-123", headers=headers)
    assert resp.status == 200
    assert {"private", "no-store"} <= cache_control(resp)
    html = await resp.text()
    assert '<a href="/account" id="who">alice</a>' in html and "Log out" in html
    assert "Cart (3)" in html and 'action="/cart/add"' in html


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/", 200),
        ("/products", 200),
        ("/cart", 200),
        ("/account", 200),
        ("/login", 200),
        ("/debug/headers", 200),
        ("/products/nope", 404),
    ],
)
async def test_gateway_pages_with_session_data_are_private(
    gateway_shop: Client, path: str, status: int
) -> None:
    headers = {
        **gw_headers(user_id="1001", username="alice", email="alice%40example.com"),
        "X-Session-Cart-Items": "2",
        "X-Session-Cart-Total": "1999.98",
    }
    resp = await gateway_shop.get(path, headers=headers, allow_redirects=False)
    assert resp.status == status
    assert {"private", "no-store"} <= cache_control(resp), resp.headers.get("Cache-Control")
    assert "public" not in cache_control(resp)
    if path != "/debug/headers":
        assert "Cart (2)" in await resp.text()  # personalised, hence private


def test_make_app_rejects_unknown_mode(sqlite_url: str) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        make_app("stateless", sqlite_url)


# ================================================================= legacy mode
def legacy_cookie(client: Client) -> str | None:
    for cookie in client.session.cookie_jar:
        if cookie.key == LEGACY_COOKIE:
            return cookie.value
    return None


async def _legacy_walk(client: Client) -> None:
    db = db_of(client)
    assert await db.count_sessions() == 0

    # A first visit creates the session row and the cookie.
    resp = await client.get("/")
    assert resp.status == 200
    guest = legacy_cookie(client)
    assert guest is not None and len(guest) == 43
    row = await db.session_get(guest)
    assert row is not None and row["user_id"] is None and row["page_views"] == 1

    # Every request: one SELECT + one UPDATE, page_views + 1, current page recorded.
    writes = db.session_writes
    for n, path in enumerate(("/products", "/products/mouse-456", "/cart"), start=2):
        await client.get(path)
        row = await db.session_get(guest)
        assert row is not None
        assert row["page_views"] == n
        assert row["current_page"] == path
    assert db.session_writes == writes + 3

    # The health check is not a page view.
    await client.get("/healthz")
    row = await db.session_get(guest)
    assert row is not None and row["page_views"] == 4

    # Guest cart in the DB.
    resp = await client.post("/cart/add", data={"sku": "mouse-456", "qty": "2"})
    assert resp.status == 200 and "Silent Mouse" in await resp.text()

    # Wrong password: still a guest.
    resp = await client.post("/login", data={"username": "alice", "password": "x"})
    assert resp.status == 401
    assert legacy_cookie(client) == guest

    # Login: row becomes the user's, token rotated, cart kept.
    resp = await client.post(
        "/login",
        data={"username": "alice", "password": "alice-password"},
        allow_redirects=False,
    )
    assert resp.status == 303 and "X-Session-Login" not in resp.headers
    user_token = legacy_cookie(client)
    assert user_token is not None and user_token != guest
    assert await db.session_get(guest) is None
    row = await db.session_get(user_token)
    assert row is not None
    assert (row["user_id"], row["username"], row["email"]) == (1001, "alice", "alice@example.com")
    assert row["login_time"] is not None
    assert '"mouse-456"' in row["cart"]

    resp = await client.get("/account")
    html = await resp.text()
    assert '<strong id="username">alice</strong>' in html
    assert "<th>page_views</th>" in html
    assert {"private", "no-store"} <= cache_control(resp)

    # Legacy pages, product pages included, show the session: never shared-cacheable.
    for path in ("/products/laptop-123", "/cart", "/"):
        resp = await client.get(path)
        assert resp.status == 200
        assert "alice" in await resp.text(), path
        assert {"private", "no-store"} <= cache_control(resp), path

    # Logout deletes the row and clears the cookie.
    resp = await client.post("/logout", allow_redirects=False)
    assert resp.status == 303
    assert await db.session_get(user_token) is None
    assert legacy_cookie(client) in (None, "")


async def test_legacy_mode_sqlite(aiohttp_client: MakeClient, sqlite_url: str) -> None:
    client = await aiohttp_client(make_app("legacy", sqlite_url))
    await _legacy_walk(client)


# postgres_url comes first so that it is torn down last, after the app closed its pool.
async def test_legacy_mode_postgresql(postgres_url: str, aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(make_app("legacy", postgres_url))
    await _legacy_walk(client)
    # A second app on the same database: the seed is idempotent.
    again = await aiohttp_client(make_app("legacy", postgres_url))
    resp = await again.get("/products")
    assert (await resp.text()).count('<li><a href="/products/') == 20


async def test_legacy_idle_sessions_expire(aiohttp_client: MakeClient, sqlite_url: str) -> None:
    client = await aiohttp_client(make_app("legacy", sqlite_url, idle_ttl=0.0))
    await client.get("/")
    first = legacy_cookie(client)
    await client.get("/")
    second = legacy_cookie(client)
    assert first and second and first != second
    assert await db_of(client).session_get(first) is None


async def test_legacy_forged_cookie_gets_a_fresh_session(
    aiohttp_client: MakeClient, sqlite_url: str
) -> None:
    client = await aiohttp_client(make_app("legacy", sqlite_url))
    forged = "x" * 43
    resp = await client.get("/", headers={"Cookie": f"{LEGACY_COOKIE}={forged}"})
    issued = resp.cookies[LEGACY_COOKIE].value
    assert issued != forged and len(issued) == 43
    assert await db_of(client).session_get(forged) is None
    assert await db_of(client).session_get(issued) is not None


# ============================================================ pages for people
async def test_unknown_paths_and_wrong_methods_get_styled_pages(gateway_shop: Client) -> None:
    auth = gw_headers(user_id="1001", username="alice", email="alice%40example.com")
    resp = await gateway_shop.get("/no/such/page", headers=auth)
    assert resp.status == 404 and resp.content_type == "text/html"
    html = await resp.text()
    assert '<p id="error-status" class="big">404 · Not Found</p>' in html
    assert '<a href="/account" id="who">alice</a>' in html  # the shop's header, logged in
    assert {"private", "no-store"} <= cache_control(resp)
    resp = await gateway_shop.request("DELETE", "/cart")
    assert resp.status == 405 and resp.headers["Allow"]
    assert "405 · Method Not Allowed" in await resp.text()


async def test_flash_messages_follow_actions_once(gateway_shop: Client) -> None:
    resp = await gateway_shop.get("/account")  # anonymous: redirected to the login form
    assert resp.url.path == "/login"
    assert '<p class="flash" id="flash" role="status">Log in to see your account.</p>' in (
        await resp.text()
    )
    assert 'id="flash"' not in await (await gateway_shop.get("/")).text()  # shown once

    auth = gw_headers(user_id="1001", username="alice", email="alice%40example.com")
    resp = await gateway_shop.post("/logout", headers=auth, data={"scope": "all"})
    assert "You are logged out on every device." in await resp.text()
    resp = await gateway_shop.post("/cart/add", data={"sku": "mouse-456", "qty": "2"})
    assert "Added 2 × Silent Mouse to your cart." in await resp.text()  # noqa: RUF001


@pytest.mark.parametrize(
    ("report", "shown"),
    [
        ("saved_items=2;guest_items=1;total_items=3", "2 items from your earlier visit were"),
        ("saved_items=1;guest_items=0;total_items=1", "Your cart still holds 1 item from"),
        ("saved_items=0;guest_items=3;total_items=3", None),
    ],
)
async def test_the_gateways_merge_report_becomes_a_sentence(
    gateway_shop: Client, report: str, shown: str | None
) -> None:
    headers = {
        **gw_headers(user_id="1001", username="alice"),
        "X-Session-Cart-Merged": report,
    }
    html = await (await gateway_shop.get("/cart", headers=headers)).text()
    if shown is None:
        assert 'id="merge-notice"' not in html
    else:
        assert 'id="merge-notice"' in html and shown in html


async def test_account_page_shows_the_cart_as_a_table(gateway_shop: Client) -> None:
    headers = {
        **gw_headers(user_id="1001", username="alice"),
        "X-Session-Cart-Contents": "laptop-123%7C2%7C999.99",
        "X-Session-Cart-Items": "2",
        "X-Session-Cart-Total": "1999.98",
    }
    html = await (await gateway_shop.get("/account", headers=headers)).text()
    assert '<table id="account-cart">' in html
    assert "<td>UltraBook 14</td><td>2</td>" in html
    assert "laptop-123|2|999.99" not in html  # the raw header value


async def test_inspector_shows_what_the_gateway_did(gateway_shop: Client) -> None:
    # The last action: the shop answered a cart add with an instruction for the gateway.
    await gateway_shop.post("/cart/add", data={"sku": "laptop-123", "qty": "1"})
    headers = {
        **gw_headers(user_id="1001", username="alice", last_activity=f"{time.time() - 12:.3f}"),
        "X-Session-Page-Cache": f"outcome=hit;path=/products/laptop-123;at={time.time():.3f};age=4",
    }
    resp = await gateway_shop.get("/inspector", headers=headers)
    assert resp.status == 200
    html = await resp.text()
    assert '<table id="received">' in html and "X-Session-User-Id" in html
    assert "12 s ago)" in html or "13 s ago)" in html  # times read as times
    assert '<table id="instructions-sent">' in html
    assert "X-Session-Cart-Add" in html and "sku=laptop-123; qty=1; price=999.99" in html
    assert "HIT: your last product page (/products/laptop-123" in html
    assert '<p id="session-writes" class="big ok">0 session writes</p>' in html
    assert "make demo" in html  # no view of Redis without the demo
    assert 'id="inspector-link"' in html  # linked from every page's header
    assert {"private", "no-store"} <= cache_control(resp)


async def test_inspector_lists_the_sessions_redis_keys(
    aiohttp_client: MakeClient, sqlite_url: str, redis_server: Any, rdb: Any
) -> None:
    sid = "ab" * 32
    rdb.hset(f"session:{sid}", mapping={"user_id": "1001", "page_views": "3"})
    rdb.expire(f"session:{sid}", 3600)
    rdb.hset("user_cart:1001", mapping={"item:a": "a|1|1.00", "total_items": "1"})
    rdb.sadd("user_sessions:1001", sid)
    rdb.hset("session:" + "cd" * 32, mapping={"user_id": "1002"})  # someone else's
    shop = await aiohttp_client(make_app("gateway", sqlite_url, inspect_redis=redis_server.url))
    headers = {**gw_headers(user_id="1001", username="alice"), "X-Session-Id": sid}
    html = await (await shop.get("/inspector", headers=headers)).text()
    assert '<table id="redis-keys">' in html
    for key in (f"session:{sid}", "user_cart:1001", "user_sessions:1001"):
        assert f'<td class="mono">{key}</td>' in html
    assert "cd" * 32 not in html
    assert "59 min" in html or "60 min" in html  # the session's TTL, readable
