"""The admin listener: /healthz is liveness, /readyz readiness (Redis takes a write, an
upstream server a connection), /metrics the session lookups and the sampled gauges."""

from __future__ import annotations

import asyncio
from typing import Any

import redis
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from gateway.gauges import ProcessGauges

from .conftest import RedisServer, Upstream, base_config, free_port, login, wait_for
from .ops_fixtures import AdminFactory, runtime_of


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_readyz_follows_redis_and_healthz_stays_alive(
    make_gateway: Any, make_admin: AdminFactory, redis_server: RedisServer
) -> None:
    gw = await make_gateway()
    admin = await make_admin(gw)
    r = await admin.get("/readyz")
    doc = await r.json()
    assert r.status == 200, doc
    assert doc["status"] == "ready"
    assert doc["checks"]["redis"]["ok"] is True
    assert next(iter(doc["checks"]["upstreams"]["servers"]["app"].values()))["ok"] is True

    redis_server.kill()
    r = await admin.get("/readyz")
    doc = await r.json()
    assert r.status == 503
    assert doc["failed"] == ["redis"]
    assert doc["checks"]["redis"]["ok"] is False and doc["checks"]["redis"]["error"]
    # Liveness does not depend on Redis: an orchestrator must not restart the gateway.
    r = await admin.get("/healthz")
    assert r.status == 200 and (await r.json())["status"] == "ok"

    redis_server.start()
    r = await admin.get("/readyz")
    assert r.status == 200, await r.text()


async def test_readyz_a_stalled_redis_fails_within_its_timeout(
    make_gateway: Any, make_admin: AdminFactory, redis_server: RedisServer
) -> None:
    import os
    import signal

    gw = await make_gateway()
    admin = await make_admin(gw)
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        async with asyncio.timeout(5):  # a guard against a hang (redis.timeout is 0.5 s)
            r = await admin.get("/readyz")
        assert r.status == 503
        assert (await r.json())["failed"] == ["redis"]
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)


async def test_readyz_needs_one_upstream_server(
    make_gateway: Any, make_admin: AdminFactory, redis_server: RedisServer, upstream: Upstream
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = base_config(redis_server.url, dead)
    gw = await make_gateway(cfg)
    admin = await make_admin(gw)
    r = await admin.get("/readyz")
    doc = await r.json()
    assert r.status == 503
    assert doc["failed"] == ["upstreams"]
    assert doc["checks"]["upstreams"]["servers"]["app"][dead]["ok"] is False

    # One server of any upstream is enough (a rarely used backend down must not take
    # every gateway out of the balancer).
    cfg["upstreams"]["other"] = {"servers": [upstream.url]}
    gw = await make_gateway(cfg)
    admin = await make_admin(gw)
    r = await admin.get("/readyz")
    doc = await r.json()
    assert r.status == 200, doc
    assert doc["checks"]["upstreams"]["servers"]["app"][dead]["ok"] is False


async def test_session_lookups_counted_by_result(
    make_gateway: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await make_gateway()

    def counts() -> dict[str, float]:
        results = ("near_cache_hit", "redis_hit", "miss", "expired", "invalid", "error")
        return {r: sample("gateway_session_lookups_total", result=r) for r in results}

    token = await login(gw, upstream, "5")
    before = counts()
    # The first read goes to Redis, the next ones come from the near-cache.
    for _ in range(3):
        assert (await gw.get("/page")).status == 200
    await asyncio.sleep(0.2)
    assert (await gw.get("/page")).status == 200
    after = counts()
    assert after["redis_hit"] - before["redis_hit"] >= 1
    assert after["near_cache_hit"] - before["near_cache_hit"] >= 1

    before = counts()
    gw.session.cookie_jar.clear()
    await gw.get("/page", cookies={"sid": "A" * 43})  # well-formed, no such session
    await gw.get("/page", cookies={"sid": "not-a-token"})
    after = counts()
    assert after["miss"] - before["miss"] == 1
    assert after["invalid"] - before["invalid"] == 1

    # Expired: older than idle_ttl by its last activity, still in Redis.
    from gateway.sessions import public_id

    rt = runtime_of(gw)
    # Activity not yet flushed would be applied to the hash read (it is the session's).
    await wait_for(lambda: rt.sessions.activity.pending_count() == 0)
    rdb.hset(f"session:{public_id(token)}", "last_activity", "1000.000")
    runtime_of(gw).sessions.cache.invalidate(None)  # type: ignore[union-attr]
    before = counts()
    await gw.get("/page", cookies={"sid": token})
    after = counts()
    assert after["expired"] - before["expired"] == 1


async def test_session_lookup_error_counted(
    make_gateway: Any, upstream: Upstream, redis_server: RedisServer
) -> None:
    gw = await make_gateway()
    token = await login(gw, upstream, "6")
    runtime_of(gw).sessions.cache.invalidate(None)  # type: ignore[union-attr]
    redis_server.kill()
    before = sample("gateway_session_lookups_total", result="error")
    await gw.get("/page", cookies={"sid": token})
    assert sample("gateway_session_lookups_total", result="error") - before == 1
    assert sample("gateway_redis_seconds_count", op="load") > 0


async def test_upstream_and_redis_latency_histograms(gw: TestClient, upstream: Upstream) -> None:
    before = sample("gateway_upstream_seconds_count", upstream="app")
    await login(gw, upstream, "7")
    await gw.get("/x")
    assert sample("gateway_upstream_seconds_count", upstream="app") - before == 2
    assert sample("gateway_redis_seconds_count", op="login") > 0


async def test_process_gauges_pools_and_upstream_health(gw: TestClient, upstream: Upstream) -> None:
    rt = runtime_of(gw)
    gauges = ProcessGauges(rt)
    pool = rt.redis.client.connection_pool
    # Held outside any command: the pool counts it in use. If redis-py changes what
    # get_connection_count reports, this fails.
    conn = await pool.get_connection()
    try:
        gauges.sample()
        assert sample("gateway_redis_pool_connections", state="in_use") >= 1
        assert sample("gateway_redis_pool_max_connections") == rt.settings.redis.max_connections
    finally:
        await pool.release(conn)
    gauges.sample()
    assert sample("gateway_redis_pool_connections", state="idle") >= 1

    await gw.get("/static/a")
    gauges.sample()
    assert sample("gateway_upstream_pool_connections", upstream="app", state="idle") >= 1
    assert sample("gateway_upstream_server_up", upstream="app", server=upstream.url) == 1
    up = rt.table.upstreams["app"]
    up.eject(up.servers[0])
    gauges.sample()
    assert sample("gateway_upstream_server_up", upstream="app", server=upstream.url) == 0
    assert sample("gateway_cpus") >= 1


async def test_metrics_endpoint_lists_the_new_metrics(
    gw: TestClient, make_admin: AdminFactory, upstream: Upstream
) -> None:
    admin = await make_admin(gw)
    await login(gw, upstream, "9")
    text = await (await admin.get("/metrics")).text()
    for name in (
        "gateway_session_lookups_total",
        "gateway_sessions_total",
        "gateway_redis_seconds_bucket",
        "gateway_redis_pool_connections",
        "gateway_upstream_seconds_bucket",
        "gateway_upstream_server_up",
        "gateway_cpu_seconds_total",
        "gateway_worker_processes",
    ):
        assert f"\n{name}" in text, name


async def test_logout_everywhere_counts_every_session_it_ended(
    make_gateway: Any, upstream: Upstream
) -> None:
    gw = await make_gateway()
    tokens = []
    for _ in range(3):
        gw.session.cookie_jar.clear()
        tokens.append(await login(gw, upstream, "31"))
    before = sample("gateway_sessions_total", event="logged_out")
    upstream.reply_headers("/bye", ("X-Session-Logout", "all"))
    resp = await gw.get("/bye", cookies={"sid": tokens[0]})
    assert resp.status == 200
    assert sample("gateway_sessions_total", event="logged_out") - before == 3
