"""Proxying: methods, bytes passed exactly, headers both ways, forwarding headers."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from .conftest import Upstream, login, raw_request, status_of


async def test_path_and_query_pass_byte_exact(gw: TestClient, upstream: Upstream) -> None:
    assert gw.port is not None
    target = b"/static/a%2Fb/c%20d;p=1?x=1&y=%41&z=%2f&&w=a+b&q=%E2%82%AC"
    raw = await raw_request(
        gw.port, b"GET " + target + b" HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n"
    )
    assert status_of(raw) == 200
    assert upstream.last.raw_path == target.decode()


async def test_session_headers_after_login(gw: TestClient, upstream: Upstream) -> None:
    await login(gw, upstream, "7", username="j%C3%B6rg", email="a%40b.c")
    resp = await gw.get("/page")
    assert resp.status == 200
    got = upstream.last
    assert got.header("X-Session-Authenticated") == "true"
    assert got.header("X-Session-User-Id") == "7"
    assert got.header("X-Session-Username") == "j%C3%B6rg"
    assert got.header("X-Session-Email") == "a@b.c"
