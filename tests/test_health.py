"""``python -m gateway health``: one line per check, exit 0/1/2, against real Redis
servers (a primary with a replica, a replica, one that is down) and real upstreams."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import yaml

from bench.topology import SentinelTopology

from .conftest import ROOT, RedisServer, Upstream, base_config, free_port, start_backend
from .topologies import topology_config


def run_health(cfg: dict[str, Any] | Path, tmp: Path, *flags: str) -> tuple[int, str]:
    if isinstance(cfg, Path):
        path = cfg
    else:
        path = tmp / f"health-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "health", "--config", str(path), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert not r.stderr.strip(), r.stderr
    return r.returncode, r.stdout


def lines(out: str) -> dict[str, tuple[str, str]]:
    """check name -> (status, detail), from the text output."""
    found = {}
    for line in out.splitlines():
        status, rest = line[:4].strip(), line[6:]
        name, detail = rest[:18].strip(), rest[19:]
        found[name] = (status, detail)
    return found


@pytest.fixture
def primary_with_replica(tmp_path: Path) -> Any:
    d1, d2 = tmp_path / "primary", tmp_path / "replica"
    d1.mkdir()
    d2.mkdir()
    primary = RedisServer(d1)
    primary.start()
    replica = RedisServer(d2, ("--replicaof", "127.0.0.1", str(primary.port)))
    replica.start()
    c = primary.client()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        info = c.info("replication")
        if info.get("connected_slaves") == 1 and info["slave0"]["state"] == "online":
            break
        time.sleep(0.05)
    else:
        raise RuntimeError("the replica did not come online")
    yield primary, replica
    c.close()
    replica.kill()
    primary.kill()


def test_every_check_ok_exits_0(
    primary_with_replica: tuple[RedisServer, RedisServer], upstream: Upstream, tmp_path: Path
) -> None:
    primary, _ = primary_with_replica
    c = primary.client()
    c.config_set("maxmemory", str(256 * 1024 * 1024))
    c.config_set("maxmemory-policy", "noeviction")
    c.config_set("appendonly", "yes")
    code, out = run_health(base_config(primary.url, upstream.url), tmp_path)
    found = lines(out)
    assert code == 0, out
    for name in (
        "config",
        "redis",
        "redis write",
        "redis role",
        "redis memory",
        "eviction policy",
        "persistence",
        "clock skew",
        "upstream app",
    ):
        assert found[name][0] == "ok", (name, out)
    assert "primary, 1 replicas" in found["redis role"][1]
    assert "round trip" in found["redis"][1]


def test_warnings_exit_1(redis_server: RedisServer, upstream: Upstream, tmp_path: Path) -> None:
    c = redis_server.client()
    c.config_set("maxmemory-policy", "allkeys-lru")
    used = int(c.info("memory")["used_memory"])
    c.config_set("maxmemory", str(int(used / 0.85)))  # ~85 % used
    code, out = run_health(base_config(redis_server.url, upstream.url), tmp_path)
    found = lines(out)
    assert code == 1, out
    assert found["redis role"][0] == "warn"  # no replica
    assert found["redis memory"][0] == "warn" and "of maxmemory" in found["redis memory"][1]
    assert found["eviction policy"][0] == "warn"
    assert "allkeys-lru" in found["eviction policy"][1]
    assert found["persistence"][0] == "warn"  # the test Redis saves nothing


def test_volatile_policy_warns_sessions_have_ttls(
    redis_server: RedisServer, upstream: Upstream, tmp_path: Path
) -> None:
    c = redis_server.client()
    c.config_set("maxmemory", str(512 * 1024 * 1024))
    c.config_set("maxmemory-policy", "volatile-lru")
    _, out = run_health(base_config(redis_server.url, upstream.url), tmp_path)
    status, detail = lines(out)["eviction policy"]
    assert status == "warn" and "keys with a TTL" in detail


def test_failures_exit_2(
    primary_with_replica: tuple[RedisServer, RedisServer],
    redis_server: RedisServer,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    _, replica = primary_with_replica
    code, out = run_health(base_config(replica.url, upstream.url), tmp_path)
    assert code == 2
    status, detail = lines(out)["redis role"]
    assert status == "fail" and detail.startswith("slave")

    # An upstream with no server reachable fails; one with some warns.
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = base_config(redis_server.url, dead)
    cfg["upstreams"]["mixed"] = {"servers": [dead, upstream.url]}
    code, out = run_health(cfg, tmp_path)
    found = lines(out)
    assert code == 2
    assert found["upstream app"][0] == "fail" and "unreachable" in found["upstream app"][1]
    assert found["upstream mixed"][0] == "warn"

    redis_server.kill()
    code, out = run_health(base_config(redis_server.url, upstream.url), tmp_path)
    found = lines(out)
    assert code == 2
    assert found["redis"][0] == "fail"
    assert "redis write" not in found  # nothing more to ask a Redis that is not there
    assert found["upstream app"][0] == "ok"


def test_bad_config_is_one_line_like_check(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("routes: []\nupstreams: {}\n")
    code, out = run_health(path, tmp_path)
    assert code == 2
    assert (
        out.strip() == "fail  config             config error: routes: must list at least one route"
    )
    check = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(path), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 2
    assert out.strip().endswith(check.stderr.strip())


def test_json_output(redis_server: RedisServer, upstream: Upstream, tmp_path: Path) -> None:
    code, out = run_health(base_config(redis_server.url, upstream.url), tmp_path, "--json")
    doc = json.loads(out)
    assert doc["status"] == "warn" and code == 1
    by_name = {c["check"]: c for c in doc["checks"]}
    assert by_name["redis"]["status"] == "ok" and by_name["redis"]["rtt_ms"] >= 0
    assert by_name["clock skew"]["skew_ms"] is not None


def test_embedded_redis_is_a_warning(upstream: Upstream, tmp_path: Path) -> None:
    code, out = run_health(base_config("embedded", upstream.url), tmp_path)
    assert code == 1
    assert lines(out)["redis"][0] == "warn"


def test_comprehensive_asks_the_running_gateway(
    gateway_process: Any, redis_server: RedisServer, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async def ok(request: Any) -> Any:
            from aiohttp import web

            return web.Response(text="ok")

        runner, url = await start_backend(ok)
        cfg = base_config(redis_server.url, url)
        gp = await asyncio.to_thread(gateway_process, cfg)
        async with aiohttp.ClientSession() as s:
            for i in range(5):
                async with s.get(gp.url + f"/static/{i}") as r:
                    assert r.status == 200
        rdb = redis.Redis(port=redis_server.port)
        rdb.hset("session:abc", "user_id", "1")  # a session without a TTL
        _, out = await asyncio.to_thread(
            run_health, gp.log_path.with_suffix(".yaml"), tmp_path, "--comprehensive"
        )
        found = lines(out)
        for name in ("redis latency", "redis refusals", "redis clients", "backups"):
            assert name in found, (name, out)
        assert found["sessions"][0] == "warn" and "1 without a TTL" in found["sessions"][1]
        assert found["gateway ready"] == ("ok", "ready")
        status, detail = found["gateway traffic"]
        assert status == "ok" and detail.startswith("5 requests since start, 0.000% 5xx")
        gp.proc.send_signal(15)
        await asyncio.to_thread(gp.proc.wait, 30)
        await runner.cleanup()

    asyncio.run(scenario())


def test_a_sentinel_topology_is_checked_on_its_master(
    sentinel: SentinelTopology, upstream: Upstream, tmp_path: Path
) -> None:
    """redis.url keeps its default ("embedded") beside redis.sentinel: the checks must
    still run, against the master the Sentinels name."""
    _, out = run_health(topology_config({"sentinel": sentinel.config()}, upstream.url), tmp_path)
    found = lines(out)
    assert found["redis"][0] == "ok", out
    assert found["redis write"][0] == "ok", out
    assert "embedded" not in out, out
