"""The background count of what Redis holds: keys by family through SCAN (never KEYS),
under the key prefix only, with a bounded number of families; memory and evictions."""

from __future__ import annotations

import asyncio
import time

import redis
from prometheus_client import REGISTRY

from bench.topology import ClusterTopology
from gateway.config import RedisSettings
from gateway.population import MAX_FAMILIES, PopulationSampler, family
from gateway.redis import Keys, make_client

from .conftest import RedisServer


def keys_gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("gateway_redis_keys", {"family": name})


def test_family_names() -> None:
    assert family("session:abc", "") == "session"
    assert family("app1:cart:{abc}", "app1:") == "cart"
    assert family("plain", "") == "other"
    assert family(":x", "") == "other"


async def test_counts_families_by_scan_never_keys(
    redis_server: RedisServer, rdb: redis.Redis
) -> None:
    rdb.config_resetstat()
    with rdb.pipeline() as p:
        for i in range(2500):
            p.hset(f"gw1:session:{i}", "user_id", "1")
        for i in range(40):
            p.hset(f"gw1:cart:{i}", "total_items", "1")
        p.sadd("gw1:user_sessions:1", "a")
        p.set("other-app:session:1", "x")  # outside the prefix: not counted
        p.execute()
    client = make_client(redis_server.url, RedisSettings(url=redis_server.url))
    sampler = PopulationSampler(client, Keys("gw1:"), interval=30, timeout=0.5)
    try:
        counts = await sampler.sample()
    finally:
        await client.aclose()
    assert counts == {"session": 2500, "cart": 40, "user_sessions": 1}
    assert keys_gauge("session") == 2500 and keys_gauge("cart") == 40
    assert (REGISTRY.get_sample_value("gateway_redis_memory_bytes", {"kind": "used"}) or 0) > 0
    stats = rdb.info("commandstats")
    assert "cmdstat_scan" in stats and stats["cmdstat_scan"]["calls"] >= 3
    assert "cmdstat_keys" not in stats

    # A family that had keys and has none now shows 0, not its old count.
    rdb.delete(*[f"gw1:cart:{i}" for i in range(40)])
    client = make_client(redis_server.url, RedisSettings(url=redis_server.url))
    sampler.redis = client
    try:
        counts = await sampler.sample()
    finally:
        await client.aclose()
    assert "cart" not in counts and keys_gauge("cart") == 0


async def test_families_are_capped(redis_server: RedisServer, rdb: redis.Redis) -> None:
    with rdb.pipeline() as p:
        for i in range(MAX_FAMILIES + 10):
            p.set(f"cap:f{i}:x", "1")
        p.execute()
    client = make_client(redis_server.url, RedisSettings(url=redis_server.url))
    try:
        counts = await PopulationSampler(client, Keys("cap:"), 30, 0.5).sample()
    finally:
        await client.aclose()
    assert len(counts) == MAX_FAMILIES + 1
    assert counts["other"] == 10
    assert sum(counts.values()) == MAX_FAMILIES + 10


async def test_runs_in_the_background_and_stops_promptly(
    redis_server: RedisServer, rdb: redis.Redis
) -> None:
    rdb.hset("session:1", "a", "1")
    client = make_client(redis_server.url, RedisSettings(url=redis_server.url))
    sampler = PopulationSampler(client, Keys(""), interval=0.05, timeout=0.5)
    sampler.start()
    try:
        for _ in range(100):
            if sampler.passes >= 3:
                break
            await asyncio.sleep(0.02)
        assert sampler.passes >= 3
    finally:
        async with asyncio.timeout(2):
            await sampler.stop()
        await client.aclose()


async def test_stop_during_a_pass_returns(redis_server: RedisServer, rdb: redis.Redis) -> None:
    """redis-py (8.2) can swallow a cancellation that lands inside a command: stop() must
    still return, not wait for the next interval (it hung a test's teardown)."""
    with rdb.pipeline() as p:
        for i in range(3000):
            p.set(f"session:{i}", "1")
        p.execute()
    client = make_client(redis_server.url, RedisSettings(url=redis_server.url))
    try:
        for i in range(30):
            sampler = PopulationSampler(client, Keys(""), interval=5, timeout=0.5)
            sampler.start()
            await asyncio.sleep(0.0005 * (i % 6))
            started = time.monotonic()
            await sampler.stop()
            # Not the 5 s of the next interval (a guard against a hang; a pass takes ms).
            assert time.monotonic() - started < 1.0
    finally:
        await client.aclose()


async def test_a_cluster_is_counted_on_every_primary(cluster: ClusterTopology) -> None:
    """A SCAN cursor belongs to one node: the pass walks each primary, and the keys of
    every slot are counted (a cluster client's scan() answers per node)."""
    rc = cluster.client()
    try:
        for i in range(300):
            rc.hset(f"gwc:session:{{{i}}}", "user_id", "1")
    finally:
        rc.close()
    settings = RedisSettings.model_validate({"cluster": cluster.config()})
    client = make_client("", settings)
    sampler = PopulationSampler(client, Keys("gwc:"), interval=30, timeout=2)
    try:
        counts = await sampler.sample()
    finally:
        await client.aclose()
    assert counts == {"session": 300}
    assert (REGISTRY.get_sample_value("gateway_redis_memory_bytes", {"kind": "used"}) or 0) > 0
