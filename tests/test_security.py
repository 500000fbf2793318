"""Security: spoofed gateway headers, hop-by-hop handling, forwarding headers, request
smuggling shapes, response sanitising, header value injection, backend instructions,
open redirects and path tricks.

Every test here runs twice in CI: with aiohttp's C parser (llhttp) and with its pure
Python parser (``AIOHTTP_NO_EXTENSIONS=1``); the assertions hold for both.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Callable, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from .conftest import GatewayFactory, Upstream, login, raw_request, status_of

pytestmark = pytest.mark.security

SPOOF = "666"


# -- helpers -------------------------------------------------------------------------------


def skey(token: str) -> str:
    return "session:" + hashlib.sha256(token.encode()).hexdigest()


def norm(name: str) -> str:
    return name.lower().replace("_", "-")


def session_names(headers: list[tuple[str, str]]) -> list[str]:
    """Every received header name that any server could read as X-Session-*."""
    return [k for k, _ in headers if norm(k).startswith("x-session-")]


def request_bytes(
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    method: str = "GET",
    token: str | None = None,
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: shop.test"]
    if token is not None:
        lines.append(f"Cookie: sid={token}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def response_headers(raw: bytes) -> list[tuple[str, str]]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    out = []
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        out.append((k.strip(), v.strip()))
    return out


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


async def get_raw(
    gw: TestClient,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    method: str = "GET",
    token: str | None = None,
    body: bytes = b"",
) -> bytes:
    assert gw.port is not None
    data = request_bytes(target, headers, method=method, token=token, body=body)
    return await raw_request(gw.port, data)


@pytest.fixture
async def evil_server() -> AsyncIterator[TestServer]:
    """A second server the gateway must never be steered to."""
    hits: list[tuple[str, list[tuple[str, str]]]] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append((request.raw_path, list(request.headers.items())))
        return web.Response(text="evil")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    srv.hits = hits  # type: ignore[attr-defined]
    yield srv
    await srv.close()


# -- 1. client spoofing of gateway headers ---------------------------------------------------

SPOOF_SETS = {
    "canonical": [("X-Session-User-Id", SPOOF)],
    "lower": [("x-session-user-id", SPOOF)],
    "upper": [("X-SESSION-USER-ID", SPOOF)],
    "mixed": [("x-SeSsIoN-uSeR-iD", SPOOF)],
    "underscores": [("X_Session_User_Id", SPOOF)],
    "mixed-separators": [("x_session-user_id", SPOOF)],
    "duplicates": [("X-Session-User-Id", SPOOF), ("X-Session-User-Id", SPOOF)],
    "all-spellings": [
        ("X-Session-User-Id", SPOOF),
        ("x_session_user_id", SPOOF),
        ("X-SESSION_USER-ID", SPOOF),
    ],
    "unknown": [("X-Session-Whatever", SPOOF), ("X_Session_Admin", SPOOF)],
    "gateway-owned": [
        ("X-Session-Authenticated", "true"),
        ("X-Session-Id", SPOOF),
        ("X_Session_Authenticated", "true"),
    ],
}


@pytest.mark.parametrize("spoofed", list(SPOOF_SETS.values()), ids=list(SPOOF_SETS))
async def test_spoofed_session_headers_without_session(
    gw: TestClient, upstream: Upstream, spoofed: list[tuple[str, str]]
) -> None:
    raw = await get_raw(gw, "/page", spoofed)
    assert status_of(raw) == 200
    got = upstream.last
    assert session_names(got.headers) == ["X-Session-Authenticated"]
    assert got.all("X-Session-Authenticated") == ["false"]


@pytest.mark.parametrize("spoofed", list(SPOOF_SETS.values()), ids=list(SPOOF_SETS))
async def test_spoofed_session_headers_with_session(
    gw: TestClient, upstream: Upstream, spoofed: list[tuple[str, str]]
) -> None:
    token = await login(gw, upstream, "7")
    raw = await get_raw(gw, "/page", spoofed, token=token)
    assert status_of(raw) == 200
    got = upstream.last
    names = session_names(got.headers)
    # Exactly one header per gateway name, each spelled the gateway's way.
    assert len(names) == len({norm(n) for n in names})
    assert [n for n in names if norm(n) == "x-session-user-id"] == ["X-Session-User-Id"]
    assert got.all("X-Session-User-Id") == ["7"]
    assert got.all("X-Session-Authenticated") == ["true"]
    assert got.all("X-Session-Id") == [hashlib.sha256(token.encode()).hexdigest()]
    assert not any(norm(n) in ("x-session-whatever", "x-session-admin") for n in names)
    assert SPOOF not in [v for k, v in got.headers if norm(k).startswith("x-session-")]


async def test_header_rules_hold_with_their_memo_full_or_warm(
    gw: TestClient, upstream: Upstream
) -> None:
    """strip_headers remembers its verdict per header name, up to a bound (headers.py
    _VERDICTS_MAX). A name it let through before is still dropped once the request lists
    it in Connection; once clients have filled the memo with new names, every spelling
    of a gateway header is still judged and removed."""
    assert status_of(await get_raw(gw, "/page", [("X-Keep-Me", "1")])) == 200
    assert upstream.last.all("X-Keep-Me") == ["1"]
    raw = await get_raw(gw, "/page", [("Connection", "X-Keep-Me"), ("X-Keep-Me", "1")])
    assert status_of(raw) == 200 and upstream.last.all("X-Keep-Me") == []
    for i in range(12):
        junk = [(f"X-Junk-{i}-{j}", "1") for j in range(100)]
        assert status_of(await get_raw(gw, "/page", junk)) == 200
    spoofed = [
        *SPOOF_SETS["all-spellings"],
        ("X_SESSION_ADMIN", SPOOF),
        ("X_Forwarded_For", "10.9.9.9"),
        ("Connection", "X-Keep-Me"),
        ("X-Keep-Me", "1"),
    ]
    assert status_of(await get_raw(gw, "/page", spoofed)) == 200
    got = upstream.last
    assert session_names(got.headers) == ["X-Session-Authenticated"]
    assert SPOOF not in [v for _, v in got.headers]
    assert "10.9.9.9" not in ",".join(got.all("X-Forwarded-For"))
    assert got.all("X-Keep-Me") == []


def test_backend_session_headers_stripped_with_the_response_memo_full() -> None:
    """The backend's answer goes through strip_headers without a drop rule, whose memo
    is the process's own: with it filled by backend header names, every X-Session-*
    spelling and every hop-by-hop or Connection-listed header is still removed."""
    from multidict import CIMultiDict, CIMultiDictProxy

    from gateway.headers import strip_headers

    for i in range(12):
        junk: CIMultiDict[str] = CIMultiDict((f"X-Resp-{i}-{j}", "1") for j in range(100))
        assert len(strip_headers(CIMultiDictProxy(junk))) == 100
    answer: CIMultiDict[str] = CIMultiDict(
        [
            ("X_SESSION_USER_ID", SPOOF),
            ("x-Session_Login", "user_id=1"),
            ("Keep-Alive", "timeout=5"),
            ("Connection", "X-Internal-Only"),
            ("X-Internal-Only", "secret"),
            ("X-Fine", "kept"),
        ]
    )
    assert list(strip_headers(CIMultiDictProxy(answer)).items()) == [("X-Fine", "kept")]


def test_instruction_headers_found_in_every_spelling_with_the_name_memo_full() -> None:
    """collect remembers which backend header names are X-Session-* spellings, up to a
    bound (headers.session_header_name): once backends have filled it with other
    names, every spelling of an instruction is still found, and a duplicate in another
    spelling is still refused."""
    from multidict import CIMultiDict, CIMultiDictProxy

    from gateway.instructions import Table, collect

    table = Table()
    for i in range(12):
        junk: CIMultiDict[str] = CIMultiDict((f"X-Junk-{i}-{j}", "1") for j in range(100))
        assert collect(CIMultiDictProxy(junk), ("login", "logout"), table) == {}
    for spelling in ("X-Session-Login", "x_session_login", "X_SESSION-LOGIN"):
        got = collect(CIMultiDictProxy(CIMultiDict({spelling: "user_id=7"})), ("login",), table)
        assert got == {"x-session-login": "user_id=7"}, spelling
    twice: CIMultiDict[str] = CIMultiDict(
        [("X-Session-Logout", "this"), ("x_session_logout", "all")]
    )
    assert collect(CIMultiDictProxy(twice), ("logout",), table) == {}


async def test_session_none_route_gets_no_session_headers_even_spoofed(
    gw: TestClient, upstream: Upstream
) -> None:
    token = await login(gw, upstream, "7")
    raw = await get_raw(gw, "/static/a.css", SPOOF_SETS["all-spellings"], token=token)
    assert status_of(raw) == 200
    assert session_names(upstream.last.headers) == []


# -- 2. Connection and hop-by-hop ------------------------------------------------------------


async def test_connection_cannot_remove_gateway_session_header(
    gw: TestClient, upstream: Upstream
) -> None:
    token = await login(gw, upstream, "7")
    assert gw.port is not None
    data = (
        b"GET /page HTTP/1.1\r\nHost: shop.test\r\nCookie: sid=" + token.encode() + b"\r\n"
        b"Connection: close, X-Session-User-Id\r\n\r\n"
    )
    raw = await raw_request(gw.port, data)
    assert status_of(raw) == 200
    assert upstream.last.all("X-Session-User-Id") == ["7"]
    assert upstream.last.all("X-Session-Authenticated") == ["true"]


async def test_connection_cannot_remove_forwarding_headers(
    gw: TestClient, upstream: Upstream
) -> None:
    assert gw.port is not None
    data = (
        b"GET /page HTTP/1.1\r\nHost: shop.test\r\n"
        b"X-Forwarded-For: 10.9.9.9\r\nX-Request-Id: client-req-0001\r\n"
        b"Connection: close\r\n"
        b"Connection: X-Forwarded-For, X-Request-Id, X-Session-Authenticated\r\n\r\n"
    )
    raw = await raw_request(gw.port, data)
    assert status_of(raw) == 200
    got = upstream.last
    assert got.all("X-Session-Authenticated") == ["false"]
    assert got.all("X-Forwarded-For") == ["127.0.0.1"]
    rids = got.all("X-Request-Id")
    assert len(rids) == 1 and re.fullmatch(r"[A-Za-z0-9._:-]{8,128}", rids[0])
    assert values(response_headers(raw), "X-Request-Id") == rids


@pytest.mark.parametrize("listed", ["X-Custom", "x_custom", "Accept-Language", "Cookie"])
async def test_headers_named_in_connection_are_removed(
    gw: TestClient, upstream: Upstream, listed: str
) -> None:
    assert gw.port is not None
    data = (
        b"GET /page HTTP/1.1\r\nHost: shop.test\r\n"
        b"X-Custom: 1\r\nAccept-Language: de\r\nCookie: pref=1\r\nX-Kept: yes\r\n"
        b"Connection: close\r\nConnection: keep-alive, " + listed.encode() + b"\r\n\r\n"
    )
    raw = await raw_request(gw.port, data)
    assert status_of(raw) == 200
    got = upstream.last
    assert not [k for k, _ in got.headers if norm(k) == norm(listed)], got.headers
    assert got.all("X-Kept") == ["yes"]
    assert got.all("Connection") in ([], ["keep-alive"], ["close"])  # the gateway's own hop


@pytest.mark.parametrize("name", ["Cookie", "cookie", "COOKIE"])
async def test_gateway_cookie_never_forwarded_in_any_spelling(
    gw: TestClient, upstream: Upstream, name: str
) -> None:
    """The token stays between client and gateway, however the Cookie header is spelled."""
    token = await login(gw, upstream, "7")
    upstream.received.clear()
    raw = await get_raw(gw, "/page", [(name, f"sid={token}")])
    assert status_of(raw) == 200
    got = upstream.last
    assert got.all("X-Session-User-Id") == ["7"]
    assert not any(token in v for _, v in got.headers), got.headers


@pytest.mark.parametrize(
    "hop",
    [
        ("Keep-Alive", "timeout=5, max=100"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        ("Proxy-Connection", "keep-alive"),
        ("Upgrade", "h2c"),
    ],
    ids=lambda h: h[0],
)
@pytest.mark.parametrize("spelling", [str, str.lower, str.upper], ids=["as-is", "lower", "upper"])
async def test_hop_by_hop_request_headers_dropped(
    gw: TestClient, upstream: Upstream, hop: tuple[str, str], spelling: Callable[[str], str]
) -> None:
    name = spelling(hop[0])
    raw = await get_raw(gw, "/page", [(name, hop[1]), ("X-Kept", "yes")])
    assert status_of(raw) == 200
    got = upstream.last
    assert got.all(hop[0]) == [], got.headers
    assert got.all("X-Kept") == ["yes"]


async def test_websocket_upgrade_on_plain_route_not_forwarded(
    gw: TestClient, upstream: Upstream
) -> None:
    assert gw.port is not None
    data = (
        b"GET /page HTTP/1.1\r\nHost: shop.test\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade, close\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    raw = await raw_request(gw.port, data)
    assert status_of(raw) == 200, raw[:300]
    assert len(upstream.received) == 1
    for r in upstream.received:
        assert r.all("Upgrade") == []
        assert "upgrade" not in ",".join(r.all("Connection")).lower()


# -- 3. forwarding headers and request id ----------------------------------------------------


async def test_client_forwarding_headers_replaced_when_peer_untrusted(
    gw: TestClient, upstream: Upstream
) -> None:
    raw = await get_raw(
        gw,
        "/page",
        [
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-For", "5.6.7.8"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
        ],
    )
    assert status_of(raw) == 200
    got = upstream.last
    assert got.all("X-Forwarded-For") == ["127.0.0.1"]
    assert got.all("X-Forwarded-Proto") == ["http"]
    assert got.all("X-Forwarded-Host") == ["shop.test"]


async def test_client_forwarded_for_appended_when_peer_trusted(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await make_gateway(trusted_proxies=["127.0.0.1/32"])
    raw = await get_raw(gw, "/page", [("X-Forwarded-For", "1.2.3.4")])
    assert status_of(raw) == 200
    assert upstream.last.all("X-Forwarded-For") == ["1.2.3.4, 127.0.0.1"]


async def test_well_formed_request_id_kept(gw: TestClient, upstream: Upstream) -> None:
    rid = "req-2024.05:abc_DEF-123"
    raw = await get_raw(gw, "/page", [("X-Request-Id", rid)])
    assert status_of(raw) == 200
    assert upstream.last.all("X-Request-Id") == [rid]
    assert values(response_headers(raw), "X-Request-Id") == [rid]


@pytest.mark.parametrize(
    "sent",
    [
        [("X-Request-Id", "has spaces in it")],
        [("X-Request-Id", "abc%0D%0AX-Evil:1")],
        [("X-Request-Id", "abcdefgh;<script>")],
        [("X-Request-Id", "short")],
        [("X-Request-Id", "a" * 129)],
        [("X-Request-Id", "")],
        [("X-Request-Id", "valid-id-0001"), ("X-Request-Id", "valid-id-0002")],
    ],
    ids=["spaces", "encoded-crlf", "bad-chars", "too-short", "too-long", "empty", "duplicated"],
)
async def test_malformed_request_id_replaced(
    gw: TestClient, upstream: Upstream, sent: list[tuple[str, str]]
) -> None:
    raw = await get_raw(gw, "/page", sent)
    assert status_of(raw) == 200
    rids = upstream.last.all("X-Request-Id")
    assert len(rids) == 1
    assert re.fullmatch(r"[0-9a-f]{32}", rids[0])
    assert rids[0] not in [v for _, v in sent]
    assert values(response_headers(raw), "X-Request-Id") == rids


# -- 4. request smuggling --------------------------------------------------------------------

HIDDEN = b"GET /account/x HTTP/1.1\r\nHost: shop.test\r\nX-Session-User-Id: 1\r\n\r\n"


def _smuggle(headers: bytes, body: bytes) -> bytes:
    start = b"POST /page HTTP/1.1\r\nHost: shop.test\r\n"
    return start + headers + b"Connection: close\r\n\r\n" + body


SMUGGLING = {
    "cl-and-te": _smuggle(
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + HIDDEN
    ),
    "te-and-cl": _smuggle(
        b"Transfer-Encoding: chunked\r\nContent-Length: 60\r\n", b"0\r\n\r\n" + HIDDEN
    ),
    "two-cl-equal": _smuggle(b"Content-Length: 4\r\nContent-Length: 4\r\n", b"abcd" + HIDDEN),
    "two-cl-different": _smuggle(b"Content-Length: 4\r\nContent-Length: 70\r\n", b"abcd" + HIDDEN),
    "cl-list": _smuggle(b"Content-Length: 4, 4\r\n", b"abcd" + HIDDEN),
    "cl-plus-sign": _smuggle(b"Content-Length: +4\r\n", b"abcd" + HIDDEN),
    "te-xchunked": _smuggle(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n" + HIDDEN),
    "te-chunked-identity": _smuggle(
        b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n" + HIDDEN
    ),
    "te-gzip-chunked": _smuggle(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n" + HIDDEN),
    "te-space-before-colon": _smuggle(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n" + HIDDEN),
    "te-vertical-tab": _smuggle(b"Transfer-Encoding: \x0bchunked\r\n", b"0\r\n\r\n" + HIDDEN),
    "te-folded": _smuggle(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n" + HIDDEN),
    "te-chunked-then-identity": _smuggle(
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", b"0\r\n\r\n" + HIDDEN
    ),
    "te-twice-chunked": _smuggle(
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + HIDDEN
    ),
    "obs-fold-space": (
        b"GET /page HTTP/1.1\r\nHost: shop.test\r\nX-A: 1\r\n X-Session-User-Id: 1\r\n"
        b"Connection: close\r\n\r\n"
    ),
    "obs-fold-tab": (
        b"GET /page HTTP/1.1\r\nHost: shop.test\r\nX-A: 1\r\n\tX-Session-User-Id: 1\r\n"
        b"Connection: close\r\n\r\n"
    ),
    "fold-after-request-line": (
        b"GET /page HTTP/1.1\r\n X-Session-User-Id: 1\r\nHost: shop.test\r\n"
        b"Connection: close\r\n\r\n"
    ),
    "bare-lf-everywhere": b"GET /page HTTP/1.1\nHost: shop.test\nConnection: close\n\n",
    "bare-lf-in-header": (
        b"GET /page HTTP/1.1\r\nHost: shop.test\r\nX-A: 1\nX-Session-User-Id: 1\r\n"
        b"Connection: close\r\n\r\n"
    ),
    "bare-cr-in-header": (
        b"GET /page HTTP/1.1\r\nHost: shop.test\r\nX-A: 1\rX-Session-User-Id: 1\r\n"
        b"Connection: close\r\n\r\n"
    ),
    "nul-in-header": (
        b"GET /page HTTP/1.1\r\nHost: shop.test\r\nX-A: a\x00b\r\nConnection: close\r\n\r\n"
    ),
    "two-hosts": (
        b"GET /page HTTP/1.1\r\nHost: shop.test\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    ),
}


@pytest.mark.parametrize("data", list(SMUGGLING.values()), ids=list(SMUGGLING))
async def test_smuggling_shapes_rejected(gw: TestClient, upstream: Upstream, data: bytes) -> None:
    assert gw.port is not None
    raw = await raw_request(gw.port, data)
    assert status_of(raw) == 400, raw[:300]
    assert upstream.received == []


@pytest.mark.parametrize(
    "te",
    [b"Transfer-Encoding:  chunked", b"Transfer-Encoding:\tchunked", b"transfer-encoding: CHUNKED"],
)
async def test_legal_te_whitespace_is_dechunked_exactly(
    gw: TestClient, upstream: Upstream, te: bytes
) -> None:
    """Optional whitespace and case are legal; what matters is one framing: the upstream
    gets the de-chunked body, and what follows the last chunk is a request of its own
    (here one the gateway answers itself: /account/ without a session), never body."""
    assert gw.port is not None
    hidden = HIDDEN.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    data = (
        b"POST /page HTTP/1.1\r\nHost: shop.test\r\n" + te + b"\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n" + hidden
    )
    raw = await raw_request(gw.port, data)
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 401" in raw
    assert [(r.method, r.raw_path, r.body) for r in upstream.received] == [
        ("POST", "/page", b"hello")
    ]


async def test_request_hidden_in_body_is_only_body(gw: TestClient, upstream: Upstream) -> None:
    token = await login(gw, upstream, "7")
    upstream.received.clear()
    raw = await get_raw(gw, "/page", method="POST", token=token, body=HIDDEN)
    assert status_of(raw) == 200
    assert len(upstream.received) == 1
    got = upstream.last
    assert (got.method, got.raw_path, got.body) == ("POST", "/page", HIDDEN)
    assert got.all("X-Session-User-Id") == ["7"]


async def test_pipelined_requests_keep_their_own_framing(
    gw: TestClient, upstream: Upstream
) -> None:
    """Two pipelined requests: the second is a request of its own, with the client's
    X-Session-* stripped like any other."""
    assert gw.port is not None
    first = b"POST /one HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 3\r\n\r\nabc"
    second = (
        b"GET /two HTTP/1.1\r\nHost: shop.test\r\nX-Session-User-Id: 1\r\nConnection: close\r\n\r\n"
    )
    raw = await raw_request(gw.port, first + second)
    assert raw.count(b"HTTP/1.1 200") == 2
    assert [(r.method, r.raw_path, r.body) for r in upstream.received] == [
        ("POST", "/one", b"abc"),
        ("GET", "/two", b""),
    ]
    for r in upstream.received:
        assert session_names(r.headers) == ["X-Session-Authenticated"]
        assert r.all("X-Session-Authenticated") == ["false"]


# -- 5. response side ------------------------------------------------------------------------


async def test_backend_session_headers_never_reach_client(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    upstream.reply_headers(
        "/page",
        ("X-Session-User-Id", "1"),
        ("x-session-authenticated", "true"),
        ("X_Session_Username", "root"),
        ("X-SESSION-WHATEVER", "x"),
        ("X-Session-Login", "user_id=5"),  # not allowed on this route
        ("x_session_login", "user_id=6"),
        ("X-Session-Set", "page_theme=dark"),
        ("X-Session-Bogus-Instruction", "1"),
        ("X-Other", "kept"),
    )
    raw = await get_raw(gw, "/page")
    assert status_of(raw) == 200
    hdrs = response_headers(raw)
    assert session_names(hdrs) == []
    assert values(hdrs, "X-Other") == ["kept"]
    assert values(hdrs, "Set-Cookie") == []
    assert rdb.keys("session:*") == []
    assert rdb.keys("user_sessions:*") == []


async def test_backend_gateway_cookie_dropped_other_cookies_kept(
    gw: TestClient, upstream: Upstream
) -> None:
    token = await login(gw, upstream, "7")
    upstream.reply_headers(
        "/page",
        ("Set-Cookie", "theme=dark; Path=/"),
        ("Set-Cookie", "sid=attacker-chosen-token-value-0000000000000; Path=/"),
        ("Set-Cookie", " sid =x; Path=/"),
        ("Set-Cookie", "lang=de; Path=/"),
    )
    raw = await get_raw(gw, "/page", token=token)
    assert status_of(raw) == 200
    cookies = values(response_headers(raw), "Set-Cookie")
    assert sorted(cookies) == ["lang=de; Path=/", "theme=dark; Path=/"]


@pytest.mark.parametrize("spelling", [str, str.lower], ids=["as-is", "lower"])
async def test_backend_hop_by_hop_response_headers_removed(
    gw: TestClient, upstream: Upstream, spelling: Callable[[str], str]
) -> None:
    pairs = [
        ("Connection", "X-Backend-Private, x_backend_other"),
        ("X-Backend-Private", "secret"),
        ("X-Backend-Other", "secret"),
        ("Keep-Alive", "timeout=99"),
        ("Proxy-Authenticate", "Basic realm=x"),
        ("Proxy-Connection", "keep-alive"),
        ("Trailer", "X-Checksum"),
        ("X-Kept", "yes"),
    ]
    upstream.reply_headers("/page", *[(spelling(k), v) for k, v in pairs])
    raw = await get_raw(gw, "/page")
    assert status_of(raw) == 200
    hdrs = response_headers(raw)
    names = {k.lower() for k, _ in hdrs}
    for gone in (
        "x-backend-private",
        "x-backend-other",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "trailer",
    ):
        assert gone not in names, hdrs
    assert values(hdrs, "Connection") == ["close"]  # the gateway's own, for this client
    assert values(hdrs, "X-Kept") == ["yes"]


# -- 6. header value injection ---------------------------------------------------------------

NASTY = "a\r\nX-Injected: 1\x00\u00e9\u20ac 100%"


async def test_session_field_with_control_chars_from_redis(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    token = await login(gw, upstream, "7")
    rdb.hset(skey(token), mapping={"nickname": NASTY, "x\r\ninjected": "1", "Bad-Name": "1"})
    raw = await get_raw(gw, "/page", token=token)
    assert status_of(raw) == 200
    got = upstream.last
    nick = got.all("X-Session-Nickname")
    assert len(nick) == 1
    assert all(0x21 <= ord(c) <= 0x7E for c in nick[0])
    assert unquote(nick[0], errors="strict") == NASTY
    names = {norm(k) for k, _ in got.headers}
    assert "x-injected" not in names
    assert not any("injected" in n or n == "x-session-bad-name" for n in names)


async def test_stored_fields_cannot_shadow_the_gateways_session_headers(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    # Fields named id/authenticated written by other software (a migration, a script)
    # would map onto X-Session-Id / X-Session-Authenticated.
    token = await login(gw, upstream, "7")
    rdb.hset(skey(token), mapping={"id": "someone-else", "authenticated": "false"})
    gw.session.cookie_jar.clear()
    raw = await get_raw(gw, "/page", token=token)
    assert status_of(raw) == 200
    got = upstream.last
    assert got.all("X-Session-Id") == [hashlib.sha256(token.encode()).hexdigest()]
    assert got.all("X-Session-Authenticated") == ["true"]
    assert got.all("X-Session-User-Id") == ["7"]


async def test_session_field_with_control_chars_via_set(gw: TestClient, upstream: Upstream) -> None:
    token = await login(gw, upstream, "7")
    upstream.reply_headers("/prefs", ("X-Session-Set", "motto=a%0D%0AX-Injected:%201%00%C3%A9"))
    resp = await gw.get("/prefs", headers={"Cookie": f"sid={token}"})
    assert resp.status == 200
    raw = await get_raw(gw, "/page", token=token)
    assert status_of(raw) == 200
    got = upstream.last
    motto = got.all("X-Session-Motto")
    assert motto == ["a%0D%0AX-Injected:%201%00%C3%A9"]
    assert got.all("X-Injected") == []


async def test_login_fields_with_control_chars(gw: TestClient, upstream: Upstream) -> None:
    token = await login(gw, upstream, "7", username="x%0D%0AX-Session-User-Id:%200")
    gw.session.cookie_jar.clear()
    raw = await get_raw(gw, "/page", token=token)
    assert status_of(raw) == 200
    got = upstream.last
    assert got.all("X-Session-User-Id") == ["7"]
    assert got.all("X-Session-Username") == ["x%0D%0AX-Session-User-Id:%200"]


# -- 7. instructions -------------------------------------------------------------------------


async def test_login_not_allowed_on_route_creates_nothing(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    upstream.reply_headers("/page", ("X-Session-Login", "user_id=1"))
    resp = await gw.get("/page")
    assert resp.status == 200
    assert resp.headers.getall("Set-Cookie", []) == []
    assert "X-Session-Login" not in resp.headers
    assert rdb.keys("*session*") == []


@pytest.mark.parametrize(
    "pairs",
    [
        [("X-Session-Login", "user_id=1"), ("X-Session-Login", "user_id=2")],
        [("X-Session-Login", "user_id=1"), ("X_Session_Login", "user_id=2")],
        [("X-Session-Login", "user_id=1; user_id=2")],
        [("X-Session-Login", "garbage")],
        [("X-Session-Login", "username=nobody")],
        [("X-Session-Login", "user_id=")],
        [("X-Session-Login", "user_id=%FF%FE")],
        [("X-Session-Login", "User-Id=1")],
        [("X-Session-Login", "")],
    ],
    ids=[
        "duplicated",
        "duplicated-spellings",
        "key-twice",
        "garbage",
        "no-user-id",
        "empty-user-id",
        "bad-utf8",
        "bad-key",
        "empty",
    ],
)
async def test_bad_login_instruction_dropped(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis, pairs: list[tuple[str, str]]
) -> None:
    upstream.reply_headers("/login", *pairs)
    resp = await gw.post("/login")
    assert resp.status == 200
    assert resp.headers.getall("Set-Cookie", []) == []
    assert not any(norm(k).startswith("x-session-") for k in resp.headers)
    assert rdb.keys("*session*") == []


@pytest.mark.parametrize(
    "instruction",
    [
        "user_id=999",
        "user_id=999; page_theme=dark",
        "login_time=1; last_activity=1",
        "authenticated=true; id=x",
        "page_views=1000",
    ],
)
async def test_set_cannot_change_reserved_fields(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis, instruction: str
) -> None:
    token = await login(gw, upstream, "7")
    before = rdb.hgetall(skey(token))
    upstream.reply_headers("/prefs", ("X-Session-Set", instruction))
    resp = await gw.get("/prefs", headers={"Cookie": f"sid={token}"})
    assert resp.status == 200
    after = rdb.hgetall(skey(token))
    for reserved in ("user_id", "login_time", "id", "authenticated"):
        assert after.get(reserved) == before.get(reserved)
    assert after.get("page_views") != "1000"
    raw = await get_raw(gw, "/page", token=token)
    got = upstream.last
    assert status_of(raw) == 200
    assert got.all("X-Session-User-Id") == ["7"]
    assert got.all("X-Session-Authenticated") == ["true"]
    assert got.all("X-Session-Id") == [hashlib.sha256(token.encode()).hexdigest()]
    if "page_theme" in instruction:
        assert got.all("X-Session-Page-Theme") == ["dark"]


@pytest.mark.parametrize(
    "pairs",
    [
        [("X-Session-Logout", "everything")],
        [("X-Session-Logout", "this"), ("X-Session-Logout", "this")],
        [("X-Session-Cart-Add", "sku=a; sku=b")],
        [("X-Session-Set", "Bad Key=1")],
        [("X-Session-Frobnicate", "1")],
    ],
    ids=["logout-unknown-scope", "logout-duplicated", "cart-key-twice", "set-bad-key", "unknown"],
)
async def test_malformed_instructions_dropped_without_error(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis, pairs: list[tuple[str, str]]
) -> None:
    token = await login(gw, upstream, "7")
    upstream.reply_headers("/act", *pairs)
    resp = await gw.get("/act", headers={"Cookie": f"sid={token}"})
    assert resp.status == 200
    assert not any(norm(k).startswith("x-session-") for k in resp.headers)
    assert resp.headers.getall("Set-Cookie", []) == []
    assert rdb.exists(skey(token))
    raw = await get_raw(gw, "/page", token=token)
    assert upstream.last.all("X-Session-Authenticated") == ["true"]
    assert status_of(raw) == 200


# -- 8. open redirect ------------------------------------------------------------------------


def _next_of(raw: bytes) -> str:
    loc = values(response_headers(raw), "Location")
    assert len(loc) == 1
    parts = urlsplit(loc[0])
    assert (parts.scheme, parts.netloc, parts.path) == ("", "", "/login")
    (nxt,) = parse_qs(parts.query, strict_parsing=True)["next"]
    return nxt


async def test_login_redirect_keeps_path_and_query(gw: TestClient, upstream: Upstream) -> None:
    raw = await get_raw(gw, "/members/x?y=1")
    assert status_of(raw) == 302
    assert values(response_headers(raw), "Location") == ["/login?next=%2Fmembers%2Fx%3Fy%3D1"]
    assert upstream.received == []


def _safe_next(nxt: str) -> None:
    assert nxt.startswith("/")
    assert not nxt.startswith("//")
    assert "\\" not in nxt
    assert urlsplit(nxt).netloc == "" and urlsplit(nxt).scheme == ""


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/x",
        "///evil.example/x",
        "/\\evil.example/x",
        "/\\/evil.example",
        "http://evil.example/",
        "http://evil.example//evil.example/members/x",
        "https://evil.example/members/x?y=1",
    ],
)
async def test_login_redirect_next_is_never_offsite(
    make_gateway: GatewayFactory, upstream: Upstream, target: str
) -> None:
    gw = await make_gateway(
        routes=[
            {"path": "/login", "upstream": "app", "session": "optional", "instructions": ["login"]},
            {"path": "/", "upstream": "app", "session": "required", "login_url": "/login"},
        ]
    )
    raw = await get_raw(gw, target)
    assert status_of(raw) in (302, 400), raw[:300]
    if status_of(raw) == 302:
        _safe_next(_next_of(raw))
    assert upstream.received == []


@pytest.mark.parametrize("target", ["/members//evil.example", "/members/\\evil.example"])
async def test_login_redirect_next_on_prefixed_route(
    gw: TestClient, upstream: Upstream, target: str
) -> None:
    raw = await get_raw(gw, target)
    assert status_of(raw) in (302, 400)
    if status_of(raw) == 302:
        _safe_next(_next_of(raw))


# -- 9. path tricks and upstream target ------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/static/../account/x",
        "/static/%2e%2e/account/x",
        "/static/.%2E/account/x",
        "/static/%2E%2E%2Faccount/x",
        "/static/..%2faccount/x",
        "/static/./../account/x",
        "/static/%2e/%2e%2e/account/x",
    ],
)
async def test_dot_segments_cannot_bypass_required_route(
    gw: TestClient, upstream: Upstream, target: str
) -> None:
    raw = await get_raw(gw, target)
    assert status_of(raw) in (400, 401), raw[:300]
    assert upstream.received == []


@pytest.mark.parametrize("form", ["scheme-relative", "absolute", "absolute-static"])
async def test_request_target_cannot_choose_upstream_host(
    gw: TestClient, upstream: Upstream, evil_server: TestServer, form: str
) -> None:
    """The request target must never steer the gateway to another host: the route's
    upstream is the only server that may receive the request (and the session)."""
    token = await login(gw, upstream, "7")
    upstream.received.clear()
    evil = f"127.0.0.1:{evil_server.port}"
    target = {
        "scheme-relative": f"//{evil}/x",
        "absolute": f"http://{evil}/x",
        "absolute-static": f"http://{evil}/static/x",
    }[form]
    raw = await get_raw(gw, target, token=token)
    assert evil_server.hits == [], (  # type: ignore[attr-defined]
        f"gateway forwarded {target!r} to {evil}: {evil_server.hits}"  # type: ignore[attr-defined]
    )
    assert status_of(raw) in (200, 400, 404)
    for r in upstream.received:
        assert r.header("Host") == urlsplit(upstream.url).netloc


@pytest.mark.parametrize(
    "name",
    [
        "Forwarded",
        "forwarded",
        "X-Real-IP",
        "x_real_ip",
        "X-Original-URL",
        "X-Rewrite-URL",
        "X-Forwarded-Port",
        "X-Forwarded-Prefix",
    ],
)
async def test_client_proxy_headers_do_not_reach_the_backend(
    gw: TestClient, upstream: Upstream, name: str
) -> None:
    assert gw.port is not None
    raw = await raw_request(
        gw.port,
        b"GET /static/f HTTP/1.1\r\nHost: shop\r\n"
        + name.encode()
        + b": for=10.9.9.9;host=evil;/account/x\r\nConnection: close\r\n\r\n",
    )
    assert status_of(raw) == 200
    low = name.lower().replace("_", "-")
    assert not [k for k in upstream.last.names() if k.lower().replace("_", "-") == low]


@pytest.mark.parametrize("target", ["/static/..;/account/x", "/static/..%3B/account/x"])
async def test_tomcat_path_parameter_dot_segment_refused(
    gw: TestClient, upstream: Upstream, target: str
) -> None:
    assert gw.port is not None
    raw = await raw_request(
        gw.port, f"GET {target} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n".encode()
    )
    assert status_of(raw) == 400
    assert upstream.received == []


async def test_bad_websocket_handshake_is_400_without_touching_upstream(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    from .conftest import BASE_ROUTES

    client = await make_gateway(
        routes=[{"path": "/ws/", "upstream": "app", "websocket": True}, *BASE_ROUTES]
    )
    resp = await client.get(
        "/ws/x",
        headers={"Upgrade": "websocket", "Connection": "Upgrade"},  # no key/version
    )
    assert resp.status == 400
    assert upstream.received == []
