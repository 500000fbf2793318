"""gateway/redis/client.py and durable.py on one node: the topology keys in config
(one topology, one-line errors, --check), TLS to Redis (rediss://), WAIT after logins
and logouts, and the key tags a cluster's activity markers get."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, parse_settings
from gateway.redis import Keys
from gateway.redis.cluster import slot_of
from gateway.redis.keys import hash_tag

from .conftest import (
    REDIS_SERVER,
    ROOT,
    GatewayFactory,
    RedisServer,
    Upstream,
    base_config,
    free_port,
    login,
    wait_for,
)

OPENSSL = shutil.which("openssl")


def minimal(**redis: Any) -> dict[str, Any]:
    return {
        "redis": redis,
        "upstreams": {"legacy": {"servers": ["http://127.0.0.1:9000"]}},
        "routes": [{"path": "/", "upstream": "legacy"}],
    }


SENTINEL = {"master": "mymaster", "nodes": ["10.0.0.1:26379", "10.0.0.2:26379"]}


@pytest.mark.parametrize(
    ("redis", "message"),
    [
        (
            {"url": "redis://x:6379/0", "sentinel": SENTINEL},
            "redis.sentinel: cannot be combined with redis.url (one topology)",
        ),
        (
            {"sentinel": SENTINEL, "cluster": {"nodes": ["10.0.0.1:7000"]}},
            "redis.cluster: cannot be combined with redis.sentinel (one topology)",
        ),
        ({"cluster": {"nodes": ["10.0.0.1"]}}, "redis.cluster.nodes: '10.0.0.1' must be host:port"),
        ({"cluster": {"nodes": []}}, "redis.cluster.nodes: must list at least one host:port"),
        ({"sentinel": {"nodes": ["h:1"]}}, "redis.sentinel.master: is required"),
        ({"sentinel": {**SENTINEL, "bogus": 1}}, "redis.sentinel.bogus: unknown key"),
        (
            {"url": "redis://x/0", "tls": {"ca": "/ca.pem"}},
            "redis.tls: needs a rediss:// url, redis.sentinel or redis.cluster",
        ),
        ({"url": "rediss://x/0", "tls": {"cert": "/c.pem"}}, "redis.tls: cert and key go together"),
        (
            {"url": "redis://x/0", "wait": {"replicas": 1, "timeout": 0.5}},
            "redis.wait.timeout: must be below redis.timeout",
        ),
        ({"url": "redis://x/0", "wait": {"replicas": 0}}, "redis.wait.replicas: "),
    ],
)
def test_bad_topology_keys_name_the_key_path(redis: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_settings(minimal(**redis))
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_topologies_parse() -> None:
    s = parse_settings(
        minimal(sentinel={**SENTINEL, "password": "hunter2-x", "sentinel_password": "q-secret"})
    )
    assert s.redis.topology == "sentinel"
    # Secrets never in a repr or a log line.
    assert "hunter2-x" not in repr(s.redis) and "q-secret" not in repr(s.redis)
    s = parse_settings(minimal(cluster={"nodes": ["10.0.0.1:7000"]}, wait={"replicas": 1}))
    assert s.redis.topology == "cluster" and s.redis.wait is not None
    assert parse_settings(minimal()).redis.topology == "url"


def _check(tmp_path: Path, cfg: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(p), "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_check_validates_topologies_and_tls_files(tmp_path: Path) -> None:
    assert _check(tmp_path, minimal(sentinel=SENTINEL)).returncode == 0
    assert _check(tmp_path, minimal(cluster={"nodes": ["10.0.0.1:7000"]})).returncode == 0
    r = _check(tmp_path, minimal(url="rediss://x/0", tls={"ca": str(tmp_path / "none.pem")}))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        r.stderr.strip().splitlines()[0]
    ] and r.stderr.startswith("config error: redis.tls.ca: cannot load")
    r = _check(tmp_path, minimal(url="redis://x/0", sentinel=SENTINEL))
    assert r.returncode == 2 and "redis.sentinel: cannot be combined" in r.stderr


def test_activity_markers_share_their_batch_slot() -> None:
    keys = Keys(hash_tags=True)
    s = keys.session("abc")
    marker = keys.activity_batch("b1", s)
    assert marker == "gw:activity:{abc}:b1"
    assert slot_of(marker) == slot_of(s)
    assert Keys().activity_batch("b1", s) == "gw:activity:b1"  # one node: as before
    # A key without a tag: the whole key as the tag hashes to the key's own slot.
    assert slot_of(hash_tag("plain:key")) == slot_of("plain:key")


async def test_wait_without_enough_replicas_refuses_logins(
    make_gateway: GatewayFactory, upstream: Upstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    cfg = base_config(redis_server.url, upstream.url)
    cfg["redis"]["wait"] = {"replicas": 1, "timeout": 0.1}
    gw = await make_gateway(cfg)
    # No replica: the login is not acknowledged.
    upstream.reply_headers("/login", ("X-Session-Login", "user_id=1"))
    resp = await gw.post("/login")
    assert resp.status == 503
    assert "sid" not in resp.cookies or not resp.cookies["sid"].value
    # With one replica it is.
    with redis_server.client() as c:
        c.config_set("repl-diskless-sync-delay", 0)  # the replica's first sync at once
    d = tmp_path / "replica"
    d.mkdir()
    replica = RedisServer(d, ("--replicaof", "127.0.0.1", str(redis_server.port)))
    replica.start()
    try:
        with redis_server.client() as c:
            await wait_for(lambda: c.info("replication").get("slave0", {}).get("state") == "online")
            # Streaming, not only synced: a replica seconds old may take longer than the
            # gateway's 0.1 s to answer its first acknowledgement request.
            c.set("ready", 1)
            assert c.execute_command("WAIT", 1, 2000) == 1
        token = await login(gw, upstream, "2")
        upstream.reply_headers("/bye", ("X-Session-Logout", "this"))
        resp = await gw.get("/bye", cookies={"sid": token})
        assert resp.status == 200
    finally:
        replica.kill()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server speaking TLS only, with a self-signed certificate (its CA); set up
    before the gateways of a test, so it stops after them."""
    if OPENSSL is None:
        pytest.skip("the openssl CLI makes the test certificate")
    subprocess.run(
        [
            OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-keyout", str(tmp_path / "key.pem"),
            "-out", str(tmp_path / "cert.pem"), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [
            REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(tmp_path / "cert.pem"),
            "--tls-key-file", str(tmp_path / "key.pem"),
            "--tls-ca-cert-file", str(tmp_path / "cert.pem"),
            "--tls-auth-clients", "no", "--save", "", "--dir", str(tmp_path),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                    break
        except OSError:
            assert time.monotonic() < deadline, "TLS redis-server did not start"
            time.sleep(0.05)
    yield port, tmp_path / "cert.pem"
    proc.kill()
    proc.wait()


async def test_rediss_with_a_ca(
    tls_redis: tuple[int, Path], make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    port, ca = tls_redis
    cfg = base_config(f"rediss://127.0.0.1:{port}/0", upstream.url)
    cfg["redis"]["tls"] = {"ca": str(ca)}
    gw = await make_gateway(cfg)
    token = await login(gw, upstream, "5")
    assert (await gw.get("/home", cookies={"sid": token})).status == 200
    assert upstream.last.header("X-Session-User-Id") == "5"
    # Without the CA the server's certificate is refused: no session.
    cfg["redis"]["tls"] = {}
    bad = await make_gateway(cfg)
    assert (await bad.get("/home", cookies={"sid": token})).status == 200
    assert upstream.last.header("X-Session-Authenticated") == "false"
