"""Signed identity headers: sign/verify alone, then a real backend verifying what the
gateway sends it, and refusing what an attacker sends it directly."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.config import ConfigError, parse_settings
from gateway.signing import sign, signed_string, verify, wsgi_headers

from .conftest import ROOT, GatewayFactory, RedisServer, base_config, start_backend

KEY = b"k" * 32
T = 1_700_000_000
HEADERS = [
    ("X-Session-Authenticated", "true"),
    ("X-Session-Id", "abc123"),
    ("X-Session-User-Id", "42"),
    ("X-Session-Email", "j%C3%B6rg%40example.com"),
    ("X-Session-Viewed", ""),
    ("Cookie", "theme=dark"),
    ("X-Forwarded-For", "10.0.0.1"),
]


def signed(headers: list[tuple[str, str]] = HEADERS, **kw: Any) -> list[tuple[str, str]]:
    args = {"method": "GET", "target": "/account/a?x=1", "now": T, **kw}
    value = sign(KEY, args["method"], args["target"], headers, args["now"])
    return [*headers, ("X-Session-Signature", value)]


def ok(headers: list[tuple[str, str]], **kw: Any) -> bool:
    args = {"method": "GET", "target": "/account/a?x=1", "now": T + 1, **kw}
    return verify(KEY, args.pop("method"), args.pop("target"), headers, **args)


# -- the format -----------------------------------------------------------------------------


def test_signed_string_is_the_documented_one() -> None:
    # README "Signed identity" documents these exact bytes; a change here is a protocol
    # change every verifying backend must follow.
    assert signed_string(T, "GET", "/account/a?x=1", HEADERS) == (
        b"v1\n1700000000\nGET\n/account/a?x=1\n"
        b"x-session-authenticated:true\n"
        b"x-session-email:j%C3%B6rg%40example.com\n"
        b"x-session-id:abc123\n"
        b"x-session-user-id:42\n"
        b"x-session-viewed:\n"
    )
    value = dict(signed())["X-Session-Signature"]
    assert re.fullmatch(r"t=1700000000,v1=[0-9a-f]{64}", value)


def test_signature_verifies() -> None:
    assert ok(signed())
    assert ok(signed(method="POST"), method="POST")
    # A mapping works as well as pairs; so does a multidict.
    assert ok(dict(signed()))  # type: ignore[arg-type]
    assert ok(CIMultiDict(signed()))  # type: ignore[arg-type]


# -- tampering ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        "method",
        "target-path",
        "target-query",
        "target-case",
        "value",
        "added",
        "added-underscore-spelling",
        "removed",
        "removed-empty",
        "duplicated",
        "mac",
        "timestamp",
        "other-key",
        "no-signature",
        "two-signatures",
    ],
)
def test_any_tampering_is_refused(change: str) -> None:
    h = signed()
    kw: dict[str, Any] = {}
    sig = dict(h)["X-Session-Signature"]
    if change == "method":
        kw["method"] = "POST"
    elif change == "target-path":
        kw["target"] = "/account/b?x=1"
    elif change == "target-query":
        kw["target"] = "/account/a?x=2"
    elif change == "target-case":
        kw["target"] = "/Account/a?x=1"
    elif change == "value":
        h = [(n, "1" if n == "X-Session-User-Id" else v) for n, v in h]
    elif change == "added":
        h.append(("X-Session-Role", "admin"))
    elif change == "added-underscore-spelling":
        # A second spelling of a signed name: a WSGI server would merge the two.
        h.append(("X_Session_User_Id", "1"))
    elif change == "removed":
        h = [(n, v) for n, v in h if n != "X-Session-Email"]
    elif change == "removed-empty":
        h = [(n, v) for n, v in h if n != "X-Session-Viewed"]
    elif change == "duplicated":
        h.append(("X-Session-User-Id", "42"))
    elif change == "mac":
        flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
        h = [(n, flipped if n == "X-Session-Signature" else v) for n, v in h]
    elif change == "timestamp":
        moved = sig.replace(f"t={T}", f"t={T + 1}")
        h = [(n, moved if n == "X-Session-Signature" else v) for n, v in h]
    elif change == "other-key":
        assert verify(b"o" * 32, "GET", "/account/a?x=1", h, now=T) is False
        return
    elif change == "no-signature":
        h = [(n, v) for n, v in h if n != "X-Session-Signature"]
    elif change == "two-signatures":
        h.append(("x-session-signature", sig))
    assert ok(signed()) is True  # the unchanged request passes: the change is what fails
    assert ok(h, **kw) is False


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        f"t={T}",
        f"v1={'0' * 64}",
        f"t={T},v1={'0' * 63}",
        f"t={T},v1={'G' * 64}",
        f"t=-{T},v1={'0' * 64}",
        f"t={T},v2={'0' * 64}",
        f"t={T}.5,v1={'0' * 64}",
        f"t={'9' * 40},v1={'0' * 64}",
    ],
)
def test_garbled_signature_is_refused(value: str) -> None:
    assert ok([*HEADERS, ("X-Session-Signature", value)]) is False


def test_timestamp_outside_max_age_is_refused() -> None:
    h = signed()
    assert ok(h, now=T + 300) is True
    assert ok(h, now=T + 301) is False
    assert ok(h, now=T - 300) is True  # a backend clock a little behind the gateway's
    assert ok(h, now=T - 301) is False
    assert ok(h, now=T + 20, max_age=10) is False


def test_order_case_and_spelling_of_names_do_not_matter() -> None:
    h = signed()
    shuffled = h[:]
    random.Random(1).shuffle(shuffled)
    assert ok(shuffled)
    assert ok([(n.upper(), v) for n, v in h])
    assert ok([(n.lower(), v) for n, v in h])
    # WSGI hands headers over as HTTP_X_SESSION_USER_ID.
    environ = {"HTTP_" + n.upper().replace("-", "_"): v for n, v in h}
    environ["REQUEST_METHOD"] = "GET"
    assert ok(wsgi_headers(environ))


def test_headers_outside_x_session_are_not_covered() -> None:
    h = [(n, "changed" if n in ("Cookie", "X-Forwarded-For") else v) for n, v in signed()]
    assert ok(h)


def test_sign_refuses_a_name_given_twice() -> None:
    with pytest.raises(ValueError):
        sign(KEY, "GET", "/", [("X-Session-A", "1"), ("x_session_a", "2")], T)


def test_signing_module_loads_without_aiohttp() -> None:
    # A backend copies or imports gateway.signing without the gateway's dependencies.
    code = (
        "import sys; sys.modules['aiohttp'] = None; sys.modules['multidict'] = None\n"
        "import gateway.signing as s\n"
        "h = [('X-Session-Id', 'a')]\n"
        "h.append(('X-Session-Signature', s.sign(b'k' * 32, 'GET', '/', h)))\n"
        "assert s.verify(b'k' * 32, 'GET', '/', h)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _readme_verify() -> Any:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(import hashlib, hmac, time\n.*?)```", text, re.S)
    assert block, "README lost its verification example"
    ns: dict[str, Any] = {}
    exec(block.group(1), ns)
    return ns["verify"]


def test_readme_example_agrees_with_verify() -> None:
    readme_verify = _readme_verify()
    h = signed(now=int(time.time()))
    lower = {n.lower(): v for n, v in h}
    assert readme_verify(KEY, "GET", "/account/a?x=1", lower) is True
    assert readme_verify(KEY, "GET", "/account/a?x=2", lower) is False
    assert readme_verify(KEY, "GET", "/account/a?x=1", {**lower, "x-session-user-id": "1"}) is False
    assert readme_verify(KEY, "GET", "/account/a?x=1", {**lower, "x-session-role": "a"}) is False
    old = {n.lower(): v for n, v in signed(now=int(time.time()) - 301)}
    assert readme_verify(KEY, "GET", "/account/a?x=1", old) is False
    no_sig = {n: v for n, v in lower.items() if n != "x-session-signature"}
    assert readme_verify(KEY, "GET", "/account/a?x=1", no_sig) is False


# -- the key in config ------------------------------------------------------------------------


def test_key_is_required_long_and_never_shown(tmp_path: Path) -> None:
    secret = "s3cr3t-" * 6
    cfg = base_config("redis://127.0.0.1:1/0", "http://127.0.0.1:1")
    cfg["signing"] = {"key": secret}
    settings = parse_settings(cfg)
    assert secret not in repr(settings) and secret not in str(settings)
    assert settings.signing is not None
    assert settings.signing.key.get_secret_value() == secret
    cfg["signing"] = {"key": "short-secret"}
    with pytest.raises(ConfigError) as e:
        parse_settings(cfg)
    assert str(e.value).startswith("signing.key: must be at least 32 characters")
    assert "short-secret" not in str(e.value)
    cfg["signing"] = {"key": secret, "header": "X-Signature"}
    with pytest.raises(ConfigError, match=r"^signing.header: must be an X-Session-\* header"):
        parse_settings(cfg)


# -- end to end ---------------------------------------------------------------------------------


SECRET = "0123456789abcdef0123456789abcdef-test"


class VerifyingBackend:
    """A real backend that checks every request it receives with ``verify`` (its clock
    moved by ``skew`` seconds) and records the verdict with the X-Session-* headers."""

    def __init__(self) -> None:
        self.skew = 0.0
        self.seen: list[tuple[bool, str, dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        good = verify(
            SECRET.encode(),
            request.method,
            request.raw_path,
            request.headers,
            now=time.time() + self.skew,
        )
        session = {k: v for k, v in request.headers.items() if k.lower().startswith("x-session-")}
        if request.headers.get("Upgrade", "").lower() == "websocket":
            self.seen.append((good, request.raw_path, session, b""))
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                await ws.send_str(f"verified={good}:{msg.data}")
            return ws
        body = await request.read()
        self.seen.append((good, request.raw_path, session, body))
        resp = web.Response(text=f"verified={good}")
        if request.path == "/login":
            resp.headers["X-Session-Login"] = "user_id=42; username=jo"
        return resp

    @property
    def last(self) -> tuple[bool, str, dict[str, str], bytes]:
        return self.seen[-1]


@pytest.mark.security
async def test_backend_verifies_gateway_requests_and_refuses_forgeries(
    make_gateway: GatewayFactory, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = VerifyingBackend()
    runner, url = await start_backend(backend.handle)
    try:
        cfg = base_config(redis_server.url, url)
        cfg["signing"] = {"key": "${TEST_SIGNING_KEY}"}
        cfg["routes"].insert(0, {"path": "/ws/", "upstream": "app", "websocket": True})
        cfg["plugins"] = [{"viewed_items": {"header": True, "flush_interval": 10}}]
        monkeypatch.setenv("TEST_SIGNING_KEY", SECRET)
        gw = await make_gateway(cfg)

        # Without a session: X-Session-Authenticated: false is signed.
        base = str(gw.make_url("/")).rstrip("/")
        # Sent byte for byte (the test client would decode %2F): the target as forwarded.
        r = await gw.session.get(URL(base + "/page?a=1&b=%2F", encoded=True))
        assert await r.text() == "verified=True"
        good, target, session, _ = backend.last
        assert good and target == "/page?a=1&b=%2F"
        assert session["X-Session-Authenticated"] == "false"
        assert "X-Session-Id" not in session

        # A session: none route: nothing about a session, but still signed.
        r = await gw.get("/static/app.css")
        assert backend.last[0] and set(backend.last[2]) == {"X-Session-Signature"}

        # The login request, then requests of the logged-in session.
        r = await gw.post("/login", data=b"user=jo&pw=x")
        assert r.status == 200 and backend.last[0]
        r = await gw.get("/products/p%201")
        r = await gw.get("/account/orders?page=2")
        good, _, session, _ = backend.last
        assert good
        assert session["X-Session-User-Id"] == "42"
        assert session["X-Session-Viewed"]  # a plugin's header, signed like the rest

        # A POST with a body larger than one chunk.
        body = bytes(range(256)) * 1024
        r = await gw.post("/account/form", data=body)
        good, _, _, received = backend.last
        assert good and received == body

        # The client's own X-Session-* headers are gone, the gateway's signature stands.
        r = await gw.get(
            "/account/me",
            headers={"X-Session-User-Id": "1", "X-Session-Signature": "t=1,v1=" + "0" * 64},
        )
        good, _, session, _ = backend.last
        assert good and session["X-Session-User-Id"] == "42"

        # A WebSocket handshake is signed too.
        async with gw.ws_connect("/ws/chat?room=1") as ws:
            await ws.send_str("hi")
            assert (await ws.receive()).data == "verified=True:hi"
        assert backend.last[0]

        assert all(good for good, *_ in backend.seen), backend.seen

        # -- an attacker who reaches the backend directly ------------------------------
        # GET /account/me as the gateway sent it, signature included.
        _, target, session, _ = next(s for s in backend.seen if s[1] == "/account/me")
        verdicts: dict[str, bool] = {}
        for name, headers in {
            "forged, unsigned": {"X-Session-User-Id": "1", "X-Session-Authenticated": "true"},
            "forged, copied signature": {**session, "X-Session-User-Id": "1"},
            "extra header, copied signature": {**session, "X-Session-Role": "admin"},
            "replayed as captured": dict(session),
        }.items():
            async with aiohttp.ClientSession() as s:
                async with s.get(URL(url + target, encoded=True), headers=headers) as resp:
                    verdicts[name] = await resp.text() == "verified=True"
        # The honest caveat: an untouched copy verifies until max_age has passed...
        assert verdicts == {
            "forged, unsigned": False,
            "forged, copied signature": False,
            "extra header, copied signature": False,
            "replayed as captured": True,
        }
        # ...and not after (the backend's clock moved past max_age).
        backend.skew = 301
        async with aiohttp.ClientSession() as s:
            async with s.get(URL(url + target, encoded=True), headers=session) as resp:
                assert await resp.text() == "verified=False"
    finally:
        await runner.cleanup()
