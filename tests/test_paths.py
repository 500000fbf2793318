"""One normalised request path (gateway/paths.py, Router.resolve): the path that picks the
route is the path the backend receives; spellings another server would read as another
route are refused.

Unit tables for canonical/readings/split_target/route_path, then the same spellings as
raw bytes through a real gateway. Marked security: they also run under aiohttp's
pure-Python parser (``AIOHTTP_NO_EXTENSIONS=1``), which hands bytes >= 0x80 over as lone
surrogates where the C parser refuses them itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import paths
from gateway.config import ConfigError, parse_settings
from gateway.paths import PathError, canonical, readings, route_path, split_target
from gateway.routing import Router
from plugins.viewed_items import item_of, item_pattern

from .conftest import (
    GatewayFactory,
    RedisServer,
    Upstream,
    base_config,
    login,
    raw_request,
    status_of,
    wait_for,
)

pytestmark = pytest.mark.security

# -- canonical ---------------------------------------------------------------------------

CANONICAL = [
    ("/", "/"),
    ("/a/b", "/a/b"),
    ("/products/laptop-123", "/products/laptop-123"),
    ("/a//b", "/a/b"),
    ("///a", "/a"),
    ("/a/", "/a/"),
    ("/a/./b", "/a/b"),
    ("/a/../b", "/b"),
    ("/../a", "/a"),
    ("/../../a/..", "/"),
    ("/a/..", "/"),
    ("/a/.", "/a/"),
    ("/a/b/..", "/a/"),
    ("/.", "/"),
    ("/a//../b", "/b"),  # merged first, then the dot segment
    ("/%2e%2E/a", "/a"),
    ("/a/%2e", "/a/"),
    ("/a/.%2e/b", "/b"),
    ("/%61%62%7e%2D%5f%2e%30", "/ab~-_.0"),
    ("/a%2fb", "/a%2Fb"),
    ("/a%2Fb/../c", "/c"),  # an encoded slash is not a separator: a%2Fb is one segment
    ("/a/..%2fb", "/a/..%2Fb"),
    ("/%c3%a9", "/%C3%A9"),
    ("/a%20b", "/a%20b"),
    ("/a%252e", "/a%252e"),  # %25 is the escape; "2e" after it is data
    ("/a;b=1/c", "/a;b=1/c"),
    ("/a\\b", "/a\\b"),
    ("/a./b", "/a./b"),
    ("/.../a", "/.../a"),
    ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
]


@pytest.mark.parametrize(("raw", "want"), CANONICAL)
def test_canonical(raw: str, want: str) -> None:
    assert canonical(raw, merge_slashes=True) == want
    # Canonical is a fixed point: reading the result again changes nothing.
    assert canonical(want, merge_slashes=True) == want


@pytest.mark.parametrize(
    ("raw", "want"),
    [("/a//b", "/a//b"), ("//a", "//a"), ("/a//../b", "/a/b"), ("/a/.//b", "/a//b")],
)
def test_canonical_without_merging_slashes(raw: str, want: str) -> None:
    assert canonical(raw, merge_slashes=False) == want


REFUSED = [
    ("", "start with /"),
    ("a/b", "start with /"),
    ("*", "start with /"),
    ("/a b", "visible ASCII"),
    ("/a\tb", "visible ASCII"),
    ("/a\x00", "visible ASCII"),
    ("/a\x7f", "visible ASCII"),
    ("/caf\xe9", "visible ASCII"),  # a latin-1 reading of byte 0xE9
    ("/caf\udce9", "visible ASCII"),  # the pure-Python parser's reading of it
    ("/a#b", "#"),
    ("/a%", "malformed"),
    ("/a%4", "malformed"),
    ("/a%zz", "malformed"),
    ("/a%4g", "malformed"),
    ("/a%+1", "malformed"),  # int("+1", 16) would accept it
    ("/a% 1", "visible ASCII"),
    ("/a%00", "control"),
    ("/a%0a", "control"),
    ("/a%1F", "control"),
    ("/a%7f", "control"),
]


@pytest.mark.parametrize(("raw", "why"), REFUSED)
def test_canonical_refuses(raw: str, why: str) -> None:
    with pytest.raises(PathError, match=why):
        canonical(raw, merge_slashes=True)
    with pytest.raises(PathError):
        readings(raw, merge_slashes=True)


# -- readings ----------------------------------------------------------------------------

READS_AS = [
    ("/Account/x", "/account/x"),
    ("/%2faccount/x", "/account/x"),  # decoded
    ("/a%252fb", "/a%2Fb"),  # decoded once
    ("/a%252fb", "/a/b"),  # decoded twice (IIS)
    ("/a\\b", "/a/b"),
    ("/a%5cb", "/a/b"),
    ("/a;p=1/b", "/a/b"),
    ("/a;/b", "/a/b"),
    ("/;x/a", "/a"),  # an empty segment with a parameter, then slashes merged
    ("/static/..;/a", "/a"),
    ("/static/..%3B/a", "/a"),  # ;params dropped after decoding (Spring)
    ("/a./b", "/a/b"),
    ("/a%2e/b", "/a/b"),
    ("/a%20/b", "/a/b"),
    ("/a.%20./b", "/a/b"),
    ("/a.;x/b", "/a/b"),
    ("/A.;x\\b", "/a/b"),  # every reading together
    ("/a/.../b", "/b"),  # a segment of dots only is read as .. (the way that climbs)
    ("/a/..%20/b", "/b"),
    ("/%2Faccount/x%2500", "/account/x%00"),  # a control byte is kept, not the reading lost
    ("/a%25zz/%2e%2e%2fb", "/b"),  # a stray % is kept as %25
    ("/a%2523/b", "/a%23/b"),  # a decoded # is data, kept encoded
]


@pytest.mark.parametrize(("raw", "reading"), READS_AS)
def test_readings_include(raw: str, reading: str) -> None:
    got = readings(raw, merge_slashes=True)
    assert reading in got
    assert canonical(raw, merge_slashes=True) not in got
    assert len(got) == len(set(got))
    # Every reading is itself a canonical path.
    for r in got:
        assert "%00" in r or canonical(r, merge_slashes=True) == r


@pytest.mark.parametrize(
    "raw",
    ["/account/x", "/static/%C3%A9", "/a%20b", "/products/laptop-123", "/a:b@c", "/a/..b/c"],
)
def test_no_other_reading(raw: str) -> None:
    # Only ASCII letters are lower-cased: the byte 0xC3 of a decoded reading is not.
    assert readings(raw, merge_slashes=True) == []


@pytest.mark.parametrize("raw", [raw for raw, _ in READS_AS])
def test_long_paths_have_the_same_readings(raw: str) -> None:
    """Readings of paths up to MEMO_LENGTH are memoised, longer ones come lazily."""
    pad = "/x" * (paths.MEMO_LENGTH // 2)
    assert len(pad + raw) > paths.MEMO_LENGTH >= len(raw)
    assert readings(pad + raw, True) == [pad + r for r in readings(raw, True)]


def test_lower_case_reading_can_be_left_out() -> None:
    assert readings("/Account/x", True) == ["/account/x"]
    assert readings("/Account/x", True, lower=False) == []
    assert "/account/x" not in readings("/Account%2fx", True, lower=False)


def test_a_gateway_that_keeps_slashes_still_reads_them_merged() -> None:
    assert "/a" in readings("//a", merge_slashes=False)
    assert readings("//a", merge_slashes=True) == []


@pytest.mark.parametrize(
    "raw",
    ["/", "/a", "/a/b/", "/Products/Laptop-123", "/a:b@c/d,e=f", "/a.b/c", "/a~b/_c-d.e"],
)
def test_plain_path_shortcut_agrees_with_the_full_reading(raw: str) -> None:
    assert paths._is_plain(raw)
    assert paths._structure(paths._escapes(raw, lenient=False), True) == raw
    assert readings(raw, True) == list(paths._others(raw, raw, raw, True))
    assert readings(raw, True, lower=False) == list(paths._others(raw, raw, raw, False)) == []


@pytest.mark.parametrize("raw", ["/a.", "/a./b", "/.", "/..", "//a", "/a%41", "/a;b", "/a\\b"])
def test_paths_another_reading_can_change_are_not_plain(raw: str) -> None:
    assert not paths._is_plain(raw)


# -- request target, strict, route paths -------------------------------------------------


@pytest.mark.parametrize(
    ("target", "want"),
    [
        ("/a?b", ("/a", "?b")),
        ("/a", ("/a", "")),
        ("/a?", ("/a", "?")),
        ("/a?x=%2f&y=a+b?c", ("/a", "?x=%2f&y=a+b?c")),
        ("http://h/a?b", ("/a", "?b")),
        ("HTTPS://u@h:1//a", ("//a", "")),
        ("http://h", ("/", "")),
        ("http://h?x", ("/", "?x")),
    ],
)
def test_split_target(target: str, want: tuple[str, str]) -> None:
    assert split_target(target) == want


@pytest.mark.parametrize(
    "target", ["*", "evil/x", "http:/x", "/a?b#c", "/a?\udce9", "/a?\xe9", "/a?b c", "/a?\x7f"]
)
def test_split_target_refuses(target: str) -> None:
    with pytest.raises(PathError):
        split_target(target)


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        ("/static/a%2Fb", True),
        ("/static/a%5Cb", True),
        ("/static/a\\b", True),
        ("/static/f;v=1", True),
        ("/static/f%3Bv=1", True),
        ("/static/a./b", True),
        ("/static/a.", True),
        ("/static/a%20/b", True),
        ("/static/a%20", True),
        ("/static/a%20b", False),
        ("/static/a.b", False),
        ("/static/%C3%A9", False),
        ("/", False),
    ],
)
def test_strict_refusal(path: str, refused: bool) -> None:
    assert (paths.strict_refusal(path) is not None) is refused


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("/", "/"),
        ("/account/", "/account/"),
        ("/caf\xe9/", "/caf%C3%A9/"),
        ("/%7euser/", "/~user/"),
        ("/a%2f/", "/a%2F/"),
    ],
)
def test_route_path(path: str, want: str) -> None:
    assert route_path(path) == want


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("account/", "must start with /"),
        ("/a/../b/", "normalised"),
        ("/a/./b/", "normalised"),
        ("/a//b/", "normalised"),
        ("/a/..", "normalised"),
        ("/a%zz/", "malformed"),
        ("/a%00/", "control"),
        ("/a b/", "visible"),
        ("/a?b", "visible"),
    ],
)
def test_route_path_that_is_not_canonical_is_a_config_error(path: str, why: str) -> None:
    cfg = {
        "upstreams": {"app": {"servers": ["http://127.0.0.1:9"]}},
        "routes": [{"path": "/", "upstream": "app"}, {"path": path, "upstream": "app"}],
    }
    with pytest.raises(ConfigError, match=rf"^routes\[1\]\.path: .*{why}"):
        parse_settings(cfg)


def _router(**paths_cfg: Any) -> Router:
    s = parse_settings(
        {
            "upstreams": {"app": {"servers": ["http://127.0.0.1:9"]}},
            "routes": [
                {"path": "/static/", "upstream": "app", "session": "none"},
                {"path": "/Account/", "upstream": "app", "session": "required"},
                {"path": "/", "upstream": "app"},
            ],
            "paths": paths_cfg,
        }
    )
    return Router(s.routes, s.paths)


def test_router_compares_routes_not_paths() -> None:
    r = _router()
    # Another reading that stays on the same route is no ambiguity.
    assert r.resolve("/static/a%2Fb;v=1", "GET", None)[1] is r.match("/static/", "GET", None)
    with pytest.raises(PathError, match="ambiguous"):
        r.resolve("/static%2F/x", "GET", None)
    # Route prefixes are case-sensitive unless configured otherwise.
    with pytest.raises(PathError, match="ambiguous"):
        r.resolve("/Account/x", "GET", None)  # lower-cased it is the / route
    ci = _router(case_insensitive=True)
    path, route = ci.resolve("/ACCOUNT/x", "GET", None)
    assert path == "/ACCOUNT/x" and route is not None and route.session == "required"


# -- through a real gateway --------------------------------------------------------------

ROUTES: list[dict[str, Any]] = [
    {"path": "/static/", "upstream": "app", "session": "none"},
    {"path": "/account/", "upstream": "app", "session": "required"},
    {"path": "/members/", "upstream": "app", "session": "required", "login_url": "/login"},
    {"path": "/login", "upstream": "app", "session": "optional", "instructions": ["login"]},
    {"path": "/", "upstream": "app", "session": "optional", "guest": True, "instructions": ["set"]},
]


def request(target: bytes, method: bytes = b"GET", cookie: str | None = None) -> bytes:
    extra = f"Cookie: sid={cookie}\r\n".encode() if cookie else b""
    return (
        method
        + b" "
        + target
        + b" HTTP/1.1\r\nHost: shop\r\n"
        + extra
        + (b"Connection: close\r\n\r\n")
    )


async def send(client: TestClient, target: bytes, **kw: Any) -> tuple[int, bytes]:
    assert client.port is not None
    raw = await raw_request(client.port, request(target, **kw))
    return status_of(raw), raw


@pytest.fixture
async def shop(make_gateway: GatewayFactory, upstream: Upstream) -> TestClient:
    """Every page the backend serves stores something for the visitor (X-Session-Set), so
    on / a request that got past the gateway's checks leaves a guest session in Redis."""
    upstream.default_headers = [("X-Session-Set", "seen=1")]
    return await make_gateway(routes=ROUTES)


AMBIGUOUS = [
    b"/%2faccount/x",
    b"/%2Faccount/x",
    b"/%252faccount/x",
    b"/account%2fx",
    b"/account;jsessionid=1/x",
    b"/account;/x",
    b"/;x/account/x",
    b"/account\\x",
    b"/account%5cx",
    b"/account%5Cx",
    b"/account./x",
    b"/account%2e/x",
    b"/account%2E%2e/x",
    b"/account%20/x",
    b"/account.%20/x",
    b"/account.;x/y",
    b"/ACCOUNT/x",
    b"/Account/x",
    b"/static/..;/account/x",
    b"/static/..%3B/account/x",
    b"/static/..%3b/account/x",
    b"/static/..%2faccount/x",
    b"/static/%2e%2e%2Faccount/x",
    b"/static/..\\account/x",
    b"/static/%2e%2e%5caccount/x",
    b"/static/%252e%252e/account/x",
    b"/static%2F../account/x",
    b"/static;v=1/f",
    b"/Static/f",
    b"/%2Faccount/x%2500",
    b"http://shop/%2faccount/x",
]


@pytest.mark.parametrize("target", AMBIGUOUS, ids=[t.decode() for t in AMBIGUOUS])
async def test_ambiguous_spelling_is_refused_before_the_session(
    shop: TestClient, upstream: Upstream, rdb: redis.Redis, target: bytes
) -> None:
    status, raw = await send(shop, target)
    assert status == 400, raw[:300]
    assert b"bad request: ambiguous path" in raw
    assert upstream.received == []
    assert b"Set-Cookie" not in raw
    assert rdb.dbsize() == 0


async def test_a_plain_visit_does_create_a_guest(
    shop: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    """The control for the test above: the same gateway does write to Redis."""
    status, raw = await send(shop, b"/x")
    assert status == 200 and b"Set-Cookie: sid=" in raw
    assert rdb.dbsize() >= 1


NORMALISED = [
    (b"//account/x", 401, None),
    (b"/static/../account/x", 401, None),
    (b"/static/%2e%2E/account/x", 401, None),
    (b"/./account/x", 401, None),
    (b"/account/.", 401, None),
    (b"/account/x;jsessionid=1", 401, None),
    (b"//static//a///b", 200, "/static/a/b"),
    (b"/static/./a/../b?q=%2f&r=..%2F", 200, "/static/b?q=%2f&r=..%2F"),
    (b"/static/%61%7E%2d%5F", 200, "/static/a~-_"),
    (b"/static/%2f%c3%a9", 200, "/static/%2F%C3%A9"),
    (b"/static/%2e%2E/static/x", 200, "/static/x"),
    (b"/static/f;v=1", 200, "/static/f;v=1"),
    (b"/static/a%2Fb/c%20d;p=1", 200, "/static/a%2Fb/c%20d;p=1"),
    (b"/static/ABC", 200, "/static/ABC"),
    (b"/static/..", 200, "/"),
    (b"http://shop/static//x?y=1", 200, "/static/x?y=1"),
    (b"http://evil.example/", 200, "/"),
]


@pytest.mark.parametrize(
    ("target", "status", "forwarded"), NORMALISED, ids=[t.decode() for t, _, _ in NORMALISED]
)
async def test_spelling_is_normalised_and_forwarded_as_routed(
    shop: TestClient, upstream: Upstream, target: bytes, status: int, forwarded: str | None
) -> None:
    got, raw = await send(shop, target)
    assert got == status, raw[:300]
    if forwarded is None:
        assert upstream.received == []
    else:
        assert [r.raw_path for r in upstream.received] == [forwarded]


BAD = [
    b"/static/%zz",
    b"/static/%4",
    b"/static/%",
    b"/static/%00",
    b"/static/%0a",
    b"/static/%1F",
    b"/static/%7f",
    b"/static/a#b",
    b"/static/a?b#c",
    b"/static/caf\xe9",  # the C parser refuses it itself; the Python one passes it on
    b"/static/a?q=\xe9",
    b"/static/a\x7f",
]


@pytest.mark.parametrize("target", BAD, ids=[repr(t)[2:-1] for t in BAD])
async def test_bad_path_is_400_without_touching_anything(
    shop: TestClient, upstream: Upstream, rdb: redis.Redis, target: bytes
) -> None:
    status, raw = await send(shop, target)
    assert status == 400, raw[:300]
    assert upstream.received == []
    assert rdb.dbsize() == 0


@pytest.mark.parametrize(
    ("method", "target", "gateway"),
    [(b"OPTIONS", b"*", True), (b"GET", b"*", False), (b"GET", b"shop:80", False)],
)
async def test_target_without_a_path_is_refused(
    shop: TestClient,
    upstream: Upstream,
    rdb: redis.Redis,
    method: bytes,
    target: bytes,
    gateway: bool,
) -> None:
    """Asterisk-form and authority-form targets name no path any route could serve: 400
    before any route or Redis. ``OPTIONS *`` reaches the gateway, which answers with its
    request id; aiohttp's parser refuses the rest itself (an asterisk outside OPTIONS,
    authority-form outside CONNECT)."""
    status, raw = await send(shop, target, method=method)
    assert status == 400, raw[:300]
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert (b"\r\nX-Request-Id: " in head) is gateway, raw[:300]
    assert upstream.received == []
    assert rdb.dbsize() == 0


async def test_absolute_form_is_its_path_and_never_picks_the_host(
    shop: TestClient, upstream: Upstream
) -> None:
    """RFC 9112 3.2.2: absolute-form is accepted; an empty path is "/". The backend gets
    origin-form, and the authority in the target is not where the gateway connects."""
    for target in (b"http://shop", b"http://evil.example:1234/"):
        status, raw = await send(shop, target)
        assert status == 200, raw[:300]
        assert upstream.last.raw_path == "/"
        assert upstream.last.header("Host") != "evil.example:1234"


async def test_refusal_is_one_log_line_without_traceback(
    shop: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.proxy"):
        status, _ = await send(shop, b"/static/..;/account/x")
    assert status == 400
    lines = [r for r in caplog.records if r.name == "gateway.proxy"]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert "ambiguous path" in lines[0].getMessage()


async def test_case_insensitive_routes_keep_the_clients_case(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await make_gateway(routes=ROUTES, paths={"case_insensitive": True})
    assert (await send(gw, b"/ACCOUNT/x"))[0] == 401
    assert (await send(gw, b"/Account/x"))[0] == 401
    assert upstream.received == []
    assert (await send(gw, b"/Static/X?Q=1"))[0] == 200
    assert upstream.last.raw_path == "/Static/X?Q=1"
    # Decoding still reads as another route.
    assert (await send(gw, b"/ACCOUNT%2fx"))[0] == 400


async def test_strict_refuses_risky_spellings_on_any_route(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await make_gateway(routes=ROUTES, paths={"strict": True})
    for target in (
        b"/static/a%2Fb",
        b"/static/a%5cb",
        b"/static/a\\b",
        b"/static/f;v=1",
        b"/static/a./b",
        b"/static/a%2e/b",
        b"/static/a%20/b",
    ):
        status, raw = await send(gw, target)
        assert status == 400, (target, raw[:200])
    assert upstream.received == []
    assert (await send(gw, b"/static/a%20b"))[0] == 200
    assert (await send(gw, b"/static/x/../y"))[0] == 200
    assert [r.raw_path for r in upstream.received] == ["/static/a%20b", "/static/y"]


async def test_slashes_kept_when_merging_is_off(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await make_gateway(routes=ROUTES, paths={"merge_slashes": False})
    assert (await send(gw, b"/static//x"))[0] == 200
    assert upstream.last.raw_path == "/static//x"
    # A slash-merging backend behind / would serve it as /account/x.
    assert (await send(gw, b"//account/x"))[0] == 400
    assert len(upstream.received) == 1


async def test_path_over_max_length_is_414(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await make_gateway(routes=ROUTES, paths={"max_length": 100})
    at_limit = b"/static/" + b"a" * 92
    status, _ = await send(gw, at_limit + b"?" + b"q" * 500)  # the query does not count
    assert status == 200
    for over in (at_limit + b"a", b"/static/" + b"%2e" * 40, b"/" + b"a" * 4000):
        status, raw = await send(gw, over)
        assert status == 414, raw[:200]
    assert [r.raw_path for r in upstream.received] == [at_limit.decode() + "?" + "q" * 500]
    assert rdb.dbsize() == 0


async def test_route_with_non_ascii_path_matches_any_escape_case(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await make_gateway(
        routes=[{"path": "/caf\xe9/", "upstream": "app", "session": "required"}, *ROUTES]
    )
    assert (await send(gw, b"/caf%c3%a9/menu"))[0] == 401
    assert (await send(gw, b"/caf%C3%A9/menu"))[0] == 401
    assert upstream.received == []


# -- everything downstream reads the canonical path ----------------------------------------


def skey(token: str) -> str:
    return "session:" + hashlib.sha256(token.encode()).hexdigest()


async def test_current_page_is_the_canonical_path(
    shop: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    token = await login(shop, upstream, "5")
    status, _ = await send(shop, b"//shop/./a/../b%2f%7e?x=1", cookie=token)
    assert status == 200
    assert upstream.last.raw_path == "/shop/b%2F~?x=1"
    await wait_for(lambda: rdb.hget(skey(token), "current_page") == "/shop/b%2F~")


async def test_login_redirect_next_is_the_canonical_target(shop: TestClient) -> None:
    status, raw = await send(shop, b"/members/./x/../y?z=%2F")
    assert status == 302
    assert b"\r\nLocation: /login?next=%2Fmembers%2Fy%3Fz%3D%252F\r\n" in raw


@pytest.mark.parametrize(
    ("path", "item"),
    [
        ("/products/laptop-123", "laptop-123"),
        ("/products/b%2Cc", "b,c"),
        ("/products/caf%C3%A9", "caf\xe9"),
        ("/products/a%2Fb", None),  # one segment, but it would name the item "a/b"
        ("/products/%FF", None),  # not UTF-8
        ("/products/a%E2%80%8Bb", None),  # a zero-width space: unprintable
        ("/products/a/b", None),
    ],
)
def test_viewed_item_is_read_from_the_canonical_path(path: str, item: str | None) -> None:
    assert item_of(item_pattern("/products/{item}"), path) == item


async def test_page_cache_shares_one_entry_across_spellings(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await make_gateway(routes=ROUTES, plugins=[{"page_cache": {"paths": ["/products/"]}}])
    results = []
    for target in (b"/products/1", b"/products/%31", b"//products/1", b"/products/x/../1"):
        status, raw = await send(gw, target)
        results.append((status, b"X-Cache: HIT" in raw))
    assert results == [(200, False), (200, True), (200, True), (200, True)]
    assert [r.raw_path for r in upstream.received] == ["/products/1"]


async def test_websocket_upstream_gets_the_canonical_target(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream
) -> None:
    async def ws_handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    ws_handler.streaming = True  # type: ignore[attr-defined]
    upstream.routes["/ws/chat"] = ws_handler
    cfg = base_config(redis_server.url, upstream.url)
    cfg["routes"].insert(0, {"path": "/ws/", "upstream": "app", "websocket": True})
    gw = await make_gateway(cfg)
    assert gw.port is not None
    handshake = (
        b"GET //ws/./chat?room=%2f HTTP/1.1\r\nHost: shop\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    # Read the handshake answer only: the upgraded connection stays open.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(handshake)
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert status_of(head) == 101
    assert [r.raw_path for r in upstream.received] == ["/ws/chat?room=%2f"]


# -- the forwarded path reads as the raw one did (found by review) ---------------------------

TOKENS = [
    "a", "account", "ACCOUNT", "static", "x", "", ".", "..", "...", "..;", ";x", "..;x",
    "%2e", "%2E%2e", "%252e%252e", "%2f", "%5c", "\\", "a\\..", ".%20", "..%20", "%20",
    "b.", "Account.", "%41ccount", ";jsessionid=1",
]  # fmt: skip


def test_the_forwarded_path_is_read_the_same_way_again() -> None:
    """Whatever ``resolve`` accepts, resolving the path it forwards picks the same route
    and is accepted too: removing dot segments must not bring together pieces that only
    another server reads as a climb (``/a/..;/account/x/..;/..``)."""
    import random

    from gateway.config import PathSettings

    settings = parse_settings(
        {
            "upstreams": {"a": {"servers": ["http://x:1"]}},
            "routes": [
                {"path": "/static/", "upstream": "a", "session": "none"},
                {"path": "/account/", "upstream": "a", "session": "required"},
                {"path": "/", "upstream": "a"},
            ],
        }
    )
    router = Router(settings.routes, PathSettings())
    rng = random.Random(1234)
    accepted = 0
    for _ in range(20_000):
        raw = "/" + "/".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 6)))
        try:
            path, route = router.resolve(raw, "GET", "h")
        except PathError:
            continue
        accepted += 1
        again, route_again = router.resolve(path, "GET", "h")
        assert (again, route_again) == (path, route), raw
    assert accepted > 1000  # the generator is not refused wholesale


@pytest.mark.parametrize(
    "raw",
    [
        "/a/..;/account/x/..;/..",
        "/.../account/x/.../..",
        "/a\\../account/a\\../..",
        "/ACCOUNT./..;/profile",
        "/a\\..;/account/x/.../..",
        "/static/%252e%252e/account/x",
        "/static/..%20/account/x",
    ],
)
def test_segments_that_climb_for_another_server_are_refused(raw: str) -> None:
    with pytest.raises(PathError):
        Router(parse_settings({
            "upstreams": {"a": {"servers": ["http://x:1"]}},
            "routes": [{"path": "/account/", "upstream": "a"}, {"path": "/", "upstream": "a"}],
        }).routes).resolve(raw, "GET", "h")  # fmt: skip
