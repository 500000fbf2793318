"""Redis Cluster against real processes: three masters with a replica each. Keys carry
hash tags; logins, carts, viewed items and logout everywhere work across slots; the
activity flush goes per slot; a master killed is replaced without a 5xx on open routes
and without losing what the gateway acknowledged."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from bench.topology import ClusterTopology
from gateway.redis import public_id
from gateway.redis.cluster import slot_of

from .conftest import GatewayFactory, Upstream, login, start_guest, wait_for
from .topologies import topology_config

HANG = 5.0
KINDS = (("open", "/home"), ("closed", "/closed/x"), ("required", "/account/x"))

ROUTES: list[dict[str, Any]] = [
    {"path": "/login", "upstream": "app", "session": "optional", "instructions": ["login"]},
    {"path": "/account/", "upstream": "app", "session": "required"},
    {"path": "/closed/", "upstream": "app", "session": "optional", "on_redis_error": "closed"},
    {
        "path": "/",
        "upstream": "app",
        "session": "optional",
        "guest": True,
        "instructions": ["set", "logout", "cart"],
    },
]


def cluster_cfg(topo: ClusterTopology, upstream: Upstream, **over: Any) -> dict[str, Any]:
    redis = {"cluster": topo.config(), **over.pop("redis", {})}
    return topology_config(redis, upstream.url, routes=ROUTES, **over)


async def get(client: TestClient, path: str, token: str | None = None) -> int:
    async with asyncio.timeout(HANG):
        resp = await client.get(path, cookies={"sid": token} if token else None)
        await resp.read()
    return resp.status


def session_key(token: str) -> str:
    return f"session:{{{public_id(token)}}}"


async def test_login_cart_viewed_and_logout_everywhere_across_slots(
    make_gateway: GatewayFactory,
    upstream: Upstream,
    cluster: ClusterTopology,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    gw = await make_gateway(
        cluster_cfg(cluster, upstream, plugins=["cart", {"viewed_items": {"flush_interval": 0.02}}])
    )
    assert "near-cache off: redis.cluster" in caplog.text
    rc = cluster.client()
    try:
        # A guest fills a cart and views an item.
        guest = await start_guest(gw, upstream)
        upstream.reply_headers("/add", ("X-Session-Cart-Add", "sku=a; qty=2; price=1.50"))
        assert await get(gw, "/add") == 200
        assert await get(gw, "/products/p1") == 200
        gid = public_id(guest)
        await wait_for(lambda: rc.zrange(f"viewed:{{{gid}}}", 0, -1) == ["p1"])
        # The login merges the guest's cart into the user's (the user's slot) and moves
        # the viewed list to the new session (another slot).
        token = await login(gw, upstream, "u1")
        sid = public_id(token)
        assert slot_of(f"viewed:{{{sid}}}") != slot_of(f"viewed:{{{gid}}}")
        assert rc.hget("user_cart:{u:u1}", "total_items") == "2"
        assert not rc.exists(f"cart:{{{gid}}}", session_key(guest))
        assert rc.zrange(f"viewed:{{{sid}}}", 0, -1) == ["p1"]
        assert not rc.exists(f"viewed:{{{gid}}}")
        # The user's cart takes every change of any of the user's sessions.
        upstream.reply_headers("/add", ("X-Session-Cart-Add", "sku=b; qty=1; price=2.00"))
        assert await get(gw, "/add") == 200
        assert rc.hget("user_cart:{u:u1}", "total_items") == "3"
        assert rc.smembers("user_sessions:{u:u1}") == {sid}
        # A second device logs in: the same cart.
        gw.session.cookie_jar.clear()
        token2 = await login(gw, upstream, "u1")
        upstream.reply_headers("/look")
        assert await get(gw, "/look", token2) == 200
        assert upstream.last.header("X-Session-Cart-Items") == "3"
        # Logout everywhere ends both, in their slots; the user's cart stays for the
        # next login.
        upstream.reply_headers("/bye", ("X-Session-Logout", "all"))
        assert await get(gw, "/bye", token2) == 200
        assert not rc.exists(session_key(token), session_key(token2))
        assert rc.hget("user_cart:{u:u1}", "total_items") == "3"
        # Every key about a session or a user carries a hash tag (single keys shared by
        # all, the ranking and the guest counter, need none).
        for m in cluster.masters():
            with m.client() as c:
                for k in c.keys("*"):
                    assert "{" in k or k in ("viewed:ranking", "gw:guests:127.0.0.1"), k
    finally:
        rc.close()


async def test_activity_is_flushed_per_slot(
    make_gateway: GatewayFactory, upstream: Upstream, cluster: ClusterTopology
) -> None:
    gw = await make_gateway(cluster_cfg(cluster, upstream))
    tokens = []
    for i in range(12):
        gw.session.cookie_jar.clear()
        tokens.append(await login(gw, upstream, f"a{i}"))
    for n, t in enumerate(tokens):
        for _ in range(n % 3 + 1):
            assert await get(gw, "/home", t) == 200
    rc = cluster.client()
    try:
        for n, t in enumerate(tokens):
            await wait_for(lambda t=t, n=n: rc.hget(session_key(t), "page_views") == str(n % 3 + 1))
        # Each flush's marker is in the slot of the sessions it wrote.
        markers = [k for m in cluster.masters() for k in m.client().keys("gw:activity:*")]
        assert markers
        for k in markers:
            assert k.startswith("gw:activity:{")
    finally:
        rc.close()


@pytest.mark.slow
async def test_master_killed_open_routes_answered_and_nothing_acknowledged_lost(
    make_gateway: GatewayFactory, upstream: Upstream, cluster: ClusterTopology
) -> None:
    gw = await make_gateway(cluster_cfg(cluster, upstream, redis={"wait": {"replicas": 1}}))
    # Sessions on every master.
    tokens: dict[int, str] = {}
    while len(tokens) < 3:
        gw.session.cookie_jar.clear()
        t = await login(gw, upstream, f"k{len(tokens)}")
        tokens.setdefault(cluster.master_of(session_key(t)).port, t)
    views: collections.Counter[str] = collections.Counter()
    statuses: dict[str, collections.Counter[int]] = {
        k: collections.Counter() for k in ("open", "closed", "required")
    }

    async def round_() -> set[str]:
        """One request per route kind per session; the sessions the open route saw."""
        seen = set()
        for t in tokens.values():
            for kind, path in KINDS:
                n = len(upstream.received)
                status = await get(gw, path, t)
                statuses[kind][status] += 1
                if len(upstream.received) > n and upstream.last.header(
                    "X-Session-Authenticated"
                ) == "true":
                    views[t] += 1
                    if kind == "open":
                        seen.add(t)
        return seen

    await round_()
    victim_port = next(iter(tokens))
    victim = tokens[victim_port]
    await asyncio.to_thread(cluster.nodes[victim_port].kill)
    began = time.monotonic()
    lost = False
    while True:
        seen = await round_()
        # Sessions on the other masters are served all along.
        assert seen >= set(tokens.values()) - {victim}, statuses
        lost = lost or victim not in seen
        if lost and victim in seen:
            break
        assert time.monotonic() - began < 30, statuses
        await asyncio.sleep(0.05)
    assert set(statuses["open"]) == {200}, statuses
    assert set(statuses["closed"]) <= {200, 503}, statuses
    assert set(statuses["required"]) <= {200, 503}, statuses
    # The promoted replica has no replica of its own until the dead node is back: until
    # then WAIT cannot be satisfied on its slots and their writes wait (README).
    await asyncio.to_thread(cluster.restart, victim_port)
    rc = cluster.client()
    try:
        for t in tokens.values():
            await wait_for(lambda t=t: rc.hget(session_key(t), "page_views") == str(views[t]), 10)
    finally:
        rc.close()


async def test_wait_refuses_a_login_the_replicas_do_not_have(
    make_gateway: GatewayFactory, upstream: Upstream, cluster: ClusterTopology
) -> None:
    gw = await make_gateway(cluster_cfg(cluster, upstream, redis={"wait": {"replicas": 1}}))
    for m in cluster.masters():
        with m.client() as c:
            c.script_flush()  # the scripts are loaded again, on every master
    token = await login(gw, upstream, "w1")
    # With the replicas up, a logout everywhere (a script on the user's slot, then the
    # sessions' DELs, each followed by WAIT) is acknowledged.
    upstream.reply_headers("/bye", ("X-Session-Logout", "all"))
    assert await get(gw, "/bye", token) == 200
    rc = cluster.client()
    assert not rc.exists(session_key(token))
    rc.close()
    gw.session.cookie_jar.clear()
    assert await login(gw, upstream, "w1")
    masters = {m.port for m in cluster.masters()}
    replicas = [n for p, n in cluster.nodes.items() if p not in masters]
    for r in replicas:
        r.stop()
    try:
        gw.session.cookie_jar.clear()
        upstream.reply_headers("/login", ("X-Session-Login", "user_id=w2"))
        async with asyncio.timeout(HANG):
            resp = await gw.post("/login")
        assert resp.status == 503
        assert "sid" not in resp.cookies or not resp.cookies["sid"].value
    finally:
        for r in replicas:
            r.cont()


async def test_login_stopped_between_slots_keeps_the_old_session(
    make_gateway: GatewayFactory, upstream: Upstream, cluster: ClusterTopology
) -> None:
    """The master of the user's slot is dead when a login comes: the login's step there
    fails before the old session's is reached, the client gets 503 and no cookie, and
    its old session (on a live master) is served as before (the new session, if its
    step ran, is reachable by no cookie)."""
    gw = await make_gateway(cluster_cfg(cluster, upstream))
    old = await login(gw, upstream, "s1")
    old_master = cluster.master_of(session_key(old))
    uid = next(
        f"s{i}"
        for i in range(2, 1000)
        if cluster.master_of(f"user_sessions:{{u:s{i}}}").port != old_master.port
    )
    dead = cluster.master_of(f"user_sessions:{{u:{uid}}}")
    await asyncio.to_thread(dead.kill)
    upstream.reply_headers("/login", ("X-Session-Login", f"user_id={uid}"))
    async with asyncio.timeout(HANG):
        resp = await gw.post("/login", cookies={"sid": old})
    assert resp.status == 503
    assert "sid" not in resp.cookies or not resp.cookies["sid"].value
    assert await get(gw, "/home", old) == 200
    assert upstream.last.header("X-Session-User-Id") == "s1"
