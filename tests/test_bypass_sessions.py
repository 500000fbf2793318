"""The ``bypass_sessions`` hook: a plugin leaves a request's session to the backend (a
gradual rollout's pass-through), and the gateway then keeps out of it entirely: no
session read or made, no cookie set or expired, no X-Session-* header in either
direction, the backend's own cookies through."""

from __future__ import annotations

import pytest
import redis

from gateway.plugin import Plugin, RequestContext

from .conftest import GatewayFactory, Upstream, login


class Bypass(Plugin):
    """Bypasses every request whose Cookie header holds ``legacy=out``."""

    def bypass_sessions(self, ctx: RequestContext) -> bool:
        return "legacy=out" in ctx.request.headers.get("Cookie", "")


class BypassBoom(Plugin):
    def bypass_sessions(self, ctx: RequestContext) -> bool:
        raise RuntimeError("boom")


class BypassBoomClosed(BypassBoom):
    fault_policy = "closed"


@pytest.mark.security
async def test_a_bypassed_request_has_no_gateway_session_either_way(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await make_gateway(plugins=["tests.test_bypass_sessions:Bypass"])
    token = await login(gw, upstream, "42", username="ann")
    gw.session.cookie_jar.clear()
    keys_before = set(rdb.keys("*"))

    # The backend's own session handling: its cookie goes out, a login it announces is
    # not the gateway's business for this visitor.
    upstream.reply_headers(
        "/page",
        ("Set-Cookie", "legacy=out2; Path=/"),
        ("X-Session-Set", "theme=dark"),
        ("X-Session-Logout", "this"),
    )
    resp = await gw.get(
        "/page",
        headers={
            "Cookie": f"sid={token}; legacy=out",
            "X-Session-User-Id": "1",
            "X_Session_Authenticated": "true",
        },
    )
    assert resp.status == 200
    got = upstream.last
    # No X-Session-* at all: not the client's, and not the gateway's (not even false).
    assert [n for n in got.names() if n.lower().replace("_", "-").startswith("x-session")] == []
    # The legacy cookie reaches the backend; the gateway's stays with the gateway.
    assert got.header("Cookie") == "legacy=out"
    # Only the backend's cookie comes back: no gateway cookie set or expired.
    assert resp.headers.getall("Set-Cookie") == ["legacy=out2; Path=/"]
    assert not [h for h in resp.headers if h.lower().startswith("x-session")]
    # Nothing was created, and the visitor's gateway session is still there.
    assert set(rdb.keys("*")) == keys_before
    assert rdb.exists(f"session:{_key_id(token)}")

    # The same visitor without the bypass: the gateway's session as always.
    upstream.reply_headers("/page")
    gw.session.cookie_jar.clear()
    await gw.get("/page", headers={"Cookie": f"sid={token}; legacy=in"})
    assert upstream.last.header("X-Session-User-Id") == "42"


async def test_a_stale_gateway_cookie_is_not_expired_when_bypassed(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await make_gateway(plugins=["tests.test_bypass_sessions:Bypass"])
    stale = "A" * 43
    resp = await gw.get("/page", headers={"Cookie": f"sid={stale}; legacy=out"})
    assert "Set-Cookie" not in resp.headers
    resp = await gw.get("/page", headers={"Cookie": f"sid={stale}; legacy=in"})
    assert resp.headers["Set-Cookie"].startswith("sid=;")


async def test_required_routes_are_never_bypassed(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await make_gateway(plugins=["tests.test_bypass_sessions:Bypass"])
    resp = await gw.get("/account/x", headers={"Cookie": "legacy=out"})
    assert resp.status == 401
    token = await login(gw, upstream, "5")
    gw.session.cookie_jar.clear()
    await gw.get("/account/x", headers={"Cookie": f"sid={token}; legacy=out"})
    assert upstream.last.header("X-Session-User-Id") == "5"


async def test_a_failing_bypass_hook_follows_its_fault_policy(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await make_gateway(plugins=["tests.test_bypass_sessions:BypassBoom"])
    resp = await gw.get("/page")
    assert resp.status == 200
    assert upstream.last.header("X-Session-Authenticated") == "false"
    gw = await make_gateway(plugins=["tests.test_bypass_sessions:BypassBoomClosed"])
    assert (await gw.get("/page")).status == 503


def _key_id(token: str) -> str:
    from gateway.redis import public_id

    return public_id(token)
