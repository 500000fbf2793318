"""gateway/redis/migrate.py: a single Redis's live sessions copied into a cluster under
hash-tagged names, then served by a cluster gateway with the same cookies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis
import yaml

from bench.topology import ClusterTopology
from gateway.redis import public_id

from .conftest import ROOT, GatewayFactory, RedisServer, Upstream, base_config, login, wait_for

ROUTES = [
    {"path": "/login", "upstream": "app", "instructions": ["login"]},
    {"path": "/", "upstream": "app", "instructions": ["logout", "cart"], "guest": True},
]
PLUGINS = ["cart", {"viewed_items": {"flush_interval": 0.02}}]


async def test_sessions_survive_the_move_to_a_cluster(
    make_gateway: GatewayFactory,
    upstream: Upstream,
    redis_server: RedisServer,
    rdb: redis.Redis,
    cluster: ClusterTopology,
    tmp_path: Path,
) -> None:
    old = await make_gateway(
        base_config(redis_server.url, upstream.url, routes=ROUTES, plugins=PLUGINS)
    )
    token = await login(old, upstream, "m1")
    upstream.reply_headers("/add", ("X-Session-Cart-Add", "sku=a; qty=3; price=2.50"))
    assert (await old.get("/add")).status == 200
    assert (await old.get("/products/p9")).status == 200
    sid = public_id(token)
    await wait_for(lambda: rdb.exists(f"viewed:{sid}"))
    rdb.set("gw:guests:1.2.3.4", 1)  # transient: not copied

    cfg_path = tmp_path / "cluster.yaml"
    cfg = base_config("redis://unused", upstream.url, routes=ROUTES, plugins=PLUGINS)
    cfg["redis"] = {"cluster": cluster.config()}
    cfg_path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "gateway.redis.migrate", "--config", str(cfg_path),
         "--source", redis_server.url],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    # A signed-in user's cart is the user's (user_cart:<user_id>), not the session's.
    assert "1 session" in r.stdout and "1 user_cart" in r.stdout and "1 user_sessions" in r.stdout
    assert "1 skipped" in r.stdout

    rc = cluster.client()
    try:
        ttl = rc.ttl(f"session:{{{sid}}}")
        assert isinstance(ttl, int) and 0 < ttl <= 600
        new = await make_gateway(cfg)
        # The same cookie, on the cluster: the session, its cart, its viewed list.
        resp = await new.get("/look", cookies={"sid": token})
        assert resp.status == 200
        assert upstream.last.header("X-Session-User-Id") == "m1"
        assert upstream.last.header("X-Session-Cart-Items") == "3"
        assert rc.zrange(f"viewed:{{{sid}}}", 0, -1) == ["p9"]
        # The user's index came along: logout everywhere ends the session.
        upstream.reply_headers("/bye", ("X-Session-Logout", "all"))
        assert (await new.get("/bye", cookies={"sid": token})).status == 200
        assert not rc.exists(f"session:{{{sid}}}")
    finally:
        rc.close()
