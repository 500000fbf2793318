"""Sessions: token format, cookies, login rotation, fixation, Set/Logout, idle and absolute
expiry, required routes, guests."""

from __future__ import annotations

import hashlib
import re
import time
from http.cookies import SimpleCookie
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient

from .conftest import BASE_ROUTES, GatewayFactory, Upstream, login, raw_request, status_of, wait_for

SHOP = {
    "path": "/shop/",
    "upstream": "app",
    "session": "optional",
    "guest": True,
    "instructions": ["login", "set", "logout", "cart"],
}


def sid_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def skey(token: str) -> str:
    return f"session:{sid_hash(token)}"


def routes_with(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [*extra, *BASE_ROUTES]


def session_config(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "cookie": {"name": "sid", "secure": False},
        "idle_ttl": 600,
        "absolute_ttl": 3600,
    }
    for k, v in over.items():
        base[k] = v
    return base


async def get_as(client: TestClient, path: str, token: str | None, **kw: Any) -> Any:
    """A request carrying exactly this token (the client's cookie jar is emptied so it
    cannot add a second sid)."""
    client.session.cookie_jar.clear()
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers["Cookie"] = f"sid={token}"
    method = kw.pop("method", "GET")
    return await client.request(method, path, headers=headers, **kw)


async def fresh_login(client: TestClient, upstream: Upstream, user_id: str, **f: str) -> str:
    client.session.cookie_jar.clear()
    return await login(client, upstream, user_id, **f)


def sid_cookies(resp: Any) -> list[str]:
    return [c for c in resp.headers.getall("Set-Cookie", []) if c.split("=", 1)[0] == "sid"]


def is_expiry(cookie: str) -> bool:
    return cookie.startswith("sid=;") and "Max-Age=0" in cookie


# The near-cache's link probes an idle connection with PING and (re)connects with HELLO
# and CLIENT TRACKING at its own pace: not commands any request caused.
_BACKGROUND = {"cmdstat_ping", "cmdstat_hello", "cmdstat_client|tracking", "cmdstat_info"}


def commands(rdb: redis.Redis) -> int:
    stats = rdb.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k not in _BACKGROUND)


# -- token format ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "short",
        "A" * 42,
        "A" * 44,
        "A" * 4000,
        "A" * 42 + "!",
        "A" * 42 + ".",
        "A" * 42 + "=",
        "*" * 43,
        "A" * 20 + "%2A" + "A" * 20,
        "",
    ],
    ids=["short", "42", "44", "huge", "bang", "dot", "equals", "glob", "pct", "empty"],
)
async def test_malformed_token_costs_no_redis_command(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis, value: str
) -> None:
    # Background commands may land between two reads: measure that noise first.
    a = commands(rdb)
    b = commands(rdb)
    noise = b - a
    resp = await get_as(gw, "/page", value)
    assert resp.status == 200
    assert upstream.last.all("X-Session-Authenticated") == ["false"]
    c = commands(rdb)
    assert c - b == noise, "the gateway sent Redis a command for a malformed token"
    # Stale cookie: expired (nothing was recorded, so no flush either).
    assert [is_expiry(x) for x in sid_cookies(resp)] == [True]
    await gw.get("/static/x")  # a round trip after the first one: nothing deferred either
    assert commands(rdb) - c == noise


async def test_command_count_does_see_a_valid_format_token(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    """The measurement above is meaningful: a well-formed token is looked up."""
    a = commands(rdb)
    b = commands(rdb)
    resp = await get_as(gw, "/page", "A" * 43)
    assert resp.status == 200
    assert commands(rdb) - b > b - a


async def test_unknown_token_gives_no_session_and_expires_cookie(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    token = "B" * 43
    resp = await get_as(gw, "/page", token)
    assert resp.status == 200
    got = upstream.last
    assert got.all("X-Session-Authenticated") == ["false"]
    assert got.all("X-Session-Id") == []
    cookies = sid_cookies(resp)
    assert len(cookies) == 1 and is_expiry(cookies[0])
    assert rdb.keys("session:*") == []


# -- the cookie ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cookie",
    ["sid={t}; sid={o}", "sid={o}; sid={t}", "sid={t}; sid={t}"],
    ids=["valid-first", "valid-second", "same-twice"],
)
async def test_two_gateway_cookies_mean_no_session(
    gw: TestClient, upstream: Upstream, cookie: str
) -> None:
    token = await fresh_login(gw, upstream, "7")
    other = "C" * 43
    assert gw.port is not None
    raw = await raw_request(
        gw.port,
        (
            f"GET /page HTTP/1.1\r\nHost: shop.test\r\nCookie: {cookie.format(t=token, o=other)}"
            "\r\nConnection: close\r\n\r\n"
        ).encode(),
    )
    assert status_of(raw) == 200
    assert upstream.last.all("X-Session-Authenticated") == ["false"]
    assert upstream.last.all("X-Session-User-Id") == []


async def test_two_cookie_headers_mean_no_session(gw: TestClient, upstream: Upstream) -> None:
    token = await fresh_login(gw, upstream, "7")
    assert gw.port is not None
    raw = await raw_request(
        gw.port,
        (
            f"GET /page HTTP/1.1\r\nHost: shop.test\r\nCookie: sid={token}\r\n"
            f"Cookie: sid={'D' * 43}\r\nConnection: close\r\n\r\n"
        ).encode(),
    )
    assert status_of(raw) == 200
    assert upstream.last.all("X-Session-Authenticated") == ["false"]


async def test_gateway_cookie_removed_from_upstream_cookie_header(
    gw: TestClient, upstream: Upstream
) -> None:
    token = await fresh_login(gw, upstream, "7")
    assert gw.port is not None
    raw = await raw_request(
        gw.port,
        (
            f"GET /page HTTP/1.1\r\nHost: shop.test\r\nCookie: a=1; sid={token}; b=2\r\n"
            "Connection: close\r\n\r\n"
        ).encode(),
    )
    assert status_of(raw) == 200
    got = upstream.last
    assert got.all("Cookie") == ["a=1; b=2"]
    assert got.all("X-Session-User-Id") == ["7"]
    assert not any(token in v for _, v in got.headers)


async def test_only_gateway_cookie_means_no_cookie_header_upstream(
    gw: TestClient, upstream: Upstream
) -> None:
    token = await fresh_login(gw, upstream, "7")
    resp = await get_as(gw, "/page", token)
    assert resp.status == 200
    assert upstream.last.all("Cookie") == []
    assert upstream.last.all("X-Session-User-Id") == ["7"]


async def test_cookie_forward_keeps_gateway_cookie(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await make_gateway(
        session=session_config(cookie={"name": "sid", "secure": False, "forward": True})
    )
    token = await fresh_login(gw, upstream, "7")
    assert gw.port is not None
    raw = await raw_request(
        gw.port,
        (
            f"GET /page HTTP/1.1\r\nHost: shop.test\r\nCookie: a=1; sid={token}; b=2\r\n"
            "Connection: close\r\n\r\n"
        ).encode(),
    )
    assert status_of(raw) == 200
    assert upstream.last.all("Cookie") == [f"a=1; sid={token}; b=2"]
    assert upstream.last.all("X-Session-User-Id") == ["7"]


# -- login -----------------------------------------------------------------------------------


def _attrs(set_cookie: str) -> tuple[str, str, dict[str, str]]:
    parts = [p.strip() for p in set_cookie.split(";")]
    name, _, value = parts[0].partition("=")
    attrs = {}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        attrs[k.lower()] = v
    return name, value, attrs


@pytest.mark.parametrize("secure", [True, False])
async def test_login_cookie_attributes(
    make_gateway: GatewayFactory, upstream: Upstream, secure: bool
) -> None:
    gw = await make_gateway(session=session_config(cookie={"name": "sid", "secure": secure}))
    upstream.reply_headers("/login", ("X-Session-Login", "user_id=42"))
    resp = await gw.post("/login")
    assert resp.status == 200
    (cookie,) = sid_cookies(resp)
    name, value, attrs = _attrs(cookie)
    assert name == "sid"
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", value)
    assert "httponly" in attrs
    assert attrs["samesite"] == "Lax"
    assert attrs["path"] == "/"
    assert attrs["max-age"] == "3600"
    assert ("secure" in attrs) is secure
    # The standard library parses it to the same thing.
    parsed = SimpleCookie()
    parsed.load(cookie)
    assert parsed["sid"].value == value


async def test_login_redis_layout(gw: TestClient, upstream: Upstream, rdb: redis.Redis) -> None:
    token = await fresh_login(gw, upstream, "42", username="john_doe", email="john%40example.com")
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)  # 32 random bytes, url-safe base64
    key = skey(token)
    stored = rdb.hgetall(key)
    assert stored["user_id"] == "42"
    assert stored["username"] == "john_doe"
    assert stored["email"] == "john@example.com"
    assert float(stored["login_time"]) == pytest.approx(time.time(), abs=60)
    assert 0 < rdb.ttl(key) <= 600
    assert rdb.smembers("user_sessions:42") == {sid_hash(token)}
    # X-Session-Id is the hash, never the token.
    await get_as(gw, "/layout-probe", token)
    assert upstream.last.all("X-Session-Id") == [sid_hash(token)]
    await wait_for(lambda: rdb.hget(key, "current_page") == "/layout-probe")
    # The raw token is nowhere in Redis: no key, no value.
    for k in rdb.scan_iter("*"):
        assert token not in k
        kind = rdb.type(k)
        if kind == "hash":
            blob = " ".join(f"{f}={v}" for f, v in rdb.hgetall(k).items())
        elif kind == "set":
            blob = " ".join(rdb.smembers(k))
        elif kind == "string":
            blob = rdb.get(k) or ""
        elif kind == "list":
            blob = " ".join(rdb.lrange(k, 0, -1))
        elif kind == "zset":
            blob = " ".join(rdb.zrange(k, 0, -1))
        else:
            blob = ""
        assert token not in blob, (k, kind)


async def test_login_twice_gives_different_tokens(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    t1 = await fresh_login(gw, upstream, "42")
    t2 = await fresh_login(gw, upstream, "42")
    assert t1 != t2
    assert rdb.exists(skey(t1)) and rdb.exists(skey(t2))
    assert rdb.smembers("user_sessions:42") == {sid_hash(t1), sid_hash(t2)}


# -- fixation --------------------------------------------------------------------------------


async def test_guest_token_does_not_survive_login(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await make_gateway(routes=routes_with(SHOP))
    # A guest exists once the backend stores something for the visitor.
    upstream.reply_headers("/shop/item", ("X-Session-Set", "theme=dark"))
    resp = await get_as(gw, "/shop/item", None)
    (cookie,) = sid_cookies(resp)
    guest = _attrs(cookie)[1]
    await wait_for(lambda: rdb.exists(skey(guest)))

    upstream.reply_headers("/login", ("X-Session-Login", "user_id=42"))
    resp = await get_as(gw, "/login", guest, method="POST")
    assert resp.status == 200
    (cookie,) = sid_cookies(resp)
    new = _attrs(cookie)[1]
    assert new != guest and re.fullmatch(r"[A-Za-z0-9_-]{43}", new)
    assert not rdb.exists(skey(guest))
    assert rdb.hget(skey(new), "user_id") == "42"

    resp = await get_as(gw, "/page", guest)
    assert upstream.last.all("X-Session-Authenticated") == ["false"]
    assert upstream.last.all("X-Session-User-Id") == []
    resp = await get_as(gw, "/after-login", new)
    assert upstream.last.all("X-Session-User-Id") == ["42"]
    # Once activity is flushed, the old session is still gone (no resurrection).
    await wait_for(lambda: rdb.hget(skey(new), "current_page") == "/after-login")
    assert not rdb.exists(skey(guest))


async def test_logged_in_token_does_not_survive_another_login(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    old = await fresh_login(gw, upstream, "1")
    upstream.reply_headers("/login", ("X-Session-Login", "user_id=2"))
    resp = await get_as(gw, "/login", old, method="POST")
    assert resp.status == 200
    (cookie,) = sid_cookies(resp)
    new = _attrs(cookie)[1]
    assert new != old
    assert not rdb.exists(skey(old))
    assert sid_hash(old) not in rdb.smembers("user_sessions:1")
    assert rdb.smembers("user_sessions:2") == {sid_hash(new)}
    await get_as(gw, "/page", old)
    assert upstream.last.all("X-Session-Authenticated") == ["false"]
    await get_as(gw, "/after-login", new)
    assert upstream.last.all("X-Session-User-Id") == ["2"]
    await wait_for(lambda: rdb.hget(skey(new), "current_page") == "/after-login")
    assert not rdb.exists(skey(old))


# -- Set and Logout --------------------------------------------------------------------------


async def test_set_updates_fields(gw: TestClient, upstream: Upstream, rdb: redis.Redis) -> None:
    token = await fresh_login(gw, upstream, "7")
    upstream.reply_headers("/prefs", ("X-Session-Set", "page_theme=dark; locale=de"))
    resp = await get_as(gw, "/prefs", token)
    assert resp.status == 200
    assert sid_cookies(resp) == []
    assert rdb.hget(skey(token), "page_theme") == "dark"
    await get_as(gw, "/page", token)
    assert upstream.last.all("X-Session-Page-Theme") == ["dark"]
    assert upstream.last.all("X-Session-Locale") == ["de"]


async def test_logout_this(gw: TestClient, upstream: Upstream, rdb: redis.Redis) -> None:
    keep = await fresh_login(gw, upstream, "7")
    token = await fresh_login(gw, upstream, "7")
    upstream.reply_headers("/bye", ("X-Session-Logout", "this"))
    resp = await get_as(gw, "/bye", token)
    assert resp.status == 200
    cookies = sid_cookies(resp)
    assert len(cookies) == 1 and is_expiry(cookies[0])
    assert not rdb.exists(skey(token))
    assert rdb.smembers("user_sessions:7") == {sid_hash(keep)}
    await get_as(gw, "/page", token)
    assert upstream.last.all("X-Session-Authenticated") == ["false"]
    await get_as(gw, "/keep-check", keep)
    assert upstream.last.all("X-Session-User-Id") == ["7"]
    # Once activity is flushed, the logged-out hash is still gone (no resurrection).
    await wait_for(lambda: rdb.hget(skey(keep), "current_page") == "/keep-check")
    assert not rdb.exists(skey(token))


async def test_logout_all(gw: TestClient, upstream: Upstream, rdb: redis.Redis) -> None:
    t1 = await fresh_login(gw, upstream, "7")
    t2 = await fresh_login(gw, upstream, "7")
    other = await fresh_login(gw, upstream, "8")
    assert rdb.smembers("user_sessions:7") == {sid_hash(t1), sid_hash(t2)}
    upstream.reply_headers("/bye", ("X-Session-Logout", "all"))
    resp = await get_as(gw, "/bye", t1)
    assert resp.status == 200
    cookies = sid_cookies(resp)
    assert len(cookies) == 1 and is_expiry(cookies[0])
    assert not rdb.exists(skey(t1))
    assert not rdb.exists(skey(t2))
    assert not rdb.exists("user_sessions:7")
    for t in (t1, t2):
        await get_as(gw, "/page", t)
        assert upstream.last.all("X-Session-Authenticated") == ["false"]
    await get_as(gw, "/page", other)
    assert upstream.last.all("X-Session-User-Id") == ["8"]


# -- expiry ----------------------------------------------------------------------------------


async def test_idle_expiry_by_redis_ttl(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await make_gateway(session=session_config(idle_ttl=1, absolute_ttl=60))
    token = await fresh_login(gw, upstream, "7")
    assert 0 < rdb.ttl(skey(token)) <= 1
    await wait_for(lambda: not rdb.exists(skey(token)), timeout=5)
    resp = await get_as(gw, "/page", token)
    assert upstream.last.all("X-Session-Authenticated") == ["false"]
    assert [is_expiry(c) for c in sid_cookies(resp)] == [True]


async def test_idle_expiry_enforced_when_key_still_exists(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await make_gateway(session=session_config(idle_ttl=1, absolute_ttl=60))
    token = await fresh_login(gw, upstream, "7")
    key = skey(token)
    await get_as(gw, "/warm", token)
    await wait_for(lambda: rdb.hget(key, "current_page") == "/warm")  # nothing pending
    rdb.persist(key)
    rdb.hset(key, "last_activity", f"{time.time() - 5:.3f}")
    resp = await get_as(gw, "/page", token)
    assert resp.status == 200
    assert upstream.last.all("X-Session-Authenticated") == ["false"]
    assert upstream.last.all("X-Session-User-Id") == []
    assert [is_expiry(c) for c in sid_cookies(resp)] == [True]
    resp = await get_as(gw, "/account/x", token)
    assert resp.status == 401


async def test_absolute_expiry_even_when_active(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    token = await fresh_login(gw, upstream, "7")
    key = skey(token)
    now = time.time()
    rdb.hset(key, mapping={"login_time": f"{now - 3600 - 1:.3f}", "last_activity": f"{now:.3f}"})
    resp = await get_as(gw, "/page", token)
    assert resp.status == 200
    assert upstream.last.all("X-Session-Authenticated") == ["false"]
    assert [is_expiry(c) for c in sid_cookies(resp)] == [True]
    resp = await get_as(gw, "/account/x", token)
    assert resp.status == 401


async def test_activity_ttl_never_exceeds_absolute_deadline(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    token = await fresh_login(gw, upstream, "7")
    key = skey(token)
    remaining = 30  # idle_ttl is 600: the deadline must win
    rdb.hset(key, "login_time", f"{time.time() - 3600 + remaining:.3f}")
    resp = await get_as(gw, "/near-deadline", token)
    assert resp.status == 200
    assert upstream.last.all("X-Session-User-Id") == ["7"]
    await wait_for(lambda: rdb.hget(key, "current_page") == "/near-deadline")
    ttl = rdb.ttl(key)
    assert 0 < ttl <= remaining


# -- route policies --------------------------------------------------------------------------


async def test_required_without_session_is_401(gw: TestClient, upstream: Upstream) -> None:
    resp = await get_as(gw, "/account/x", None)
    assert resp.status == 401
    resp = await get_as(gw, "/account/x", "E" * 43)
    assert resp.status == 401
    assert [is_expiry(c) for c in sid_cookies(resp)] == [True]
    assert upstream.received == []


async def test_required_with_session_passes(gw: TestClient, upstream: Upstream) -> None:
    token = await fresh_login(gw, upstream, "7")
    resp = await get_as(gw, "/account/x", token)
    assert resp.status == 200
    assert upstream.last.raw_path == "/account/x"
    assert upstream.last.all("X-Session-User-Id") == ["7"]


async def test_required_with_login_url_redirects(gw: TestClient, upstream: Upstream) -> None:
    resp = await get_as(gw, "/members/x?y=1", None, allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/login?next=%2Fmembers%2Fx%3Fy%3D1"
    resp = await get_as(gw, "/members/x", None, method="POST", allow_redirects=False)
    assert resp.status == 401  # no redirect for a form post
    assert upstream.received == []


async def test_session_none_gets_no_session_headers(gw: TestClient, upstream: Upstream) -> None:
    token = await fresh_login(gw, upstream, "7")
    resp = await get_as(gw, "/static/app.css", token)
    assert resp.status == 200
    assert sid_cookies(resp) == []
    names = [k for k, _ in upstream.last.headers]
    assert not [n for n in names if n.lower().replace("_", "-").startswith("x-session-")]


# -- guests ----------------------------------------------------------------------------------


async def test_guest_session(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await make_gateway(routes=routes_with(SHOP))
    # A visit that stores nothing creates nothing: the visitor is anonymous.
    resp = await get_as(gw, "/shop/item", None)
    assert resp.status == 200
    assert sid_cookies(resp) == []
    assert upstream.last.all("X-Session-Authenticated") == ["false"]
    assert upstream.last.all("X-Session-Id") == []
    assert rdb.keys("session:*") == []

    # The backend stores something: now the visitor gets a guest session.
    upstream.reply_headers("/shop/item", ("X-Session-Set", "theme=dark"))
    resp = await get_as(gw, "/shop/item", None)
    assert resp.status == 200
    (cookie,) = sid_cookies(resp)
    name, token, attrs = _attrs(cookie)
    assert name == "sid"
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    assert "httponly" in attrs
    key = skey(token)
    await wait_for(lambda: rdb.hget(key, "page_views") == "1")
    stored = rdb.hgetall(key)
    assert stored["current_page"] == "/shop/item"
    assert stored["theme"] == "dark"
    assert "user_id" not in stored
    assert 0 < rdb.ttl(key) <= 600

    # Second visit: same guest, no new cookie, views counted.
    upstream.reply_headers("/shop/other")
    resp = await get_as(gw, "/shop/other", token)
    assert sid_cookies(resp) == []
    assert upstream.last.all("X-Session-Id") == [sid_hash(token)]
    assert upstream.last.all("X-Session-Authenticated") == ["false"]
    assert upstream.last.all("X-Session-Theme") == ["dark"]
    await wait_for(lambda: rdb.hget(key, "page_views") == "2")


async def test_guests_only_when_needed_and_capped_per_address(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    """Issue 10.3: cookieless requests (404s, 500s, bots) mint nothing; a backend that
    stores something for every visitor gets at most limits.guests_per_address guests
    per minute from one address."""
    gw = await make_gateway(routes=routes_with(SHOP), limits={"guests_per_address": 5})

    async def not_found(request: Any) -> Any:
        from aiohttp import web

        return web.Response(status=404, text="no such page")

    upstream.routes["/shop/missing"] = not_found
    for path in ("/shop/missing", "/shop/a", "/favicon.ico", "/shop/b") * 25:
        resp = await get_as(gw, path, None)
        assert sid_cookies(resp) == []
    assert rdb.keys("session:*") == []

    upstream.reply_headers("/shop/cart", ("X-Session-Set", "theme=dark"))
    created = []
    statuses = []
    for _ in range(12):
        resp = await get_as(gw, "/shop/cart", None)
        statuses.append(resp.status)
        created += sid_cookies(resp)
    assert len(created) == 5
    assert len(rdb.keys("session:*")) == 5
    # Past the cap the visitor is told (429), not left to believe the change was kept.
    assert statuses == [200] * 5 + [429] * 7
    assert resp.headers["Retry-After"] == "60"


async def test_non_guest_route_creates_no_session(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    resp = await get_as(gw, "/page", None)
    assert resp.status == 200
    assert sid_cookies(resp) == []
    assert upstream.last.all("X-Session-Id") == []
    assert rdb.keys("session:*") == []


async def test_session_without_login_time_gets_one_so_absolute_expiry_applies(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    """Migrated data may lack login_time; the first lookup stamps it (once)."""
    import secrets

    token = secrets.token_urlsafe(32)
    key = "session:" + hashlib.sha256(token.encode()).hexdigest()
    rdb.hset(key, mapping={"user_id": "5", "last_activity": f"{time.time():.3f}"})
    rdb.expire(key, 600)
    resp = await gw.get("/page", cookies={"sid": token})
    assert resp.status == 200
    assert upstream.last.header("X-Session-User-Id") == "5"
    stamped = rdb.hget(key, "login_time")
    assert stamped is not None and abs(float(stamped) - time.time()) < 30
    await gw.get("/page", cookies={"sid": token})
    assert rdb.hget(key, "login_time") == stamped  # not moved by later requests
