"""gateway.embedded: a private redis-server child with AOF persistence."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.redis.embedded import EmbeddedRedis, EmbeddedRedisError

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


async def _roundtrip(data_dir: Path) -> None:
    """Start, write, stop, start again in the same dir: the AOF brings the data back."""
    first = EmbeddedRedis(data_dir)
    url = await first.start()
    pid = first.pid
    try:
        client = aioredis.from_url(url)
        await client.set("greeting", "hello")
        await client.hset("session:abc", mapping={"user_id": "12345", "page_views": "3"})
        await client.aclose()
    finally:
        await first.stop()
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the child is gone, not orphaned
    assert (data_dir / "appendonlydir").is_dir(), "AOF directory was not written"

    second = EmbeddedRedis(data_dir)
    url = await second.start()
    try:
        client = aioredis.from_url(url)
        assert await client.get("greeting") == b"hello"
        assert await client.hgetall("session:abc") == {b"user_id": b"12345", b"page_views": b"3"}
        info = await client.info("persistence")
        assert info["aof_enabled"] == 1
        await client.aclose()
    finally:
        await second.stop()


async def test_unix_socket_data_survives_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis"  # created by start()
    server = EmbeddedRedis(data_dir)
    url = await server.start()
    try:
        assert url.startswith("unix://") and url.endswith("/redis.sock")
        sock = data_dir / "redis.sock"
        assert sock.is_socket()
        assert (sock.stat().st_mode & 0o777) == 0o700, "socket must be private to this user"
    finally:
        await server.stop()
    await _roundtrip(data_dir)


async def test_long_path_falls_back_to_password_protected_loopback(tmp_path: Path) -> None:
    data_dir = tmp_path / ("d" * 60) / ("e" * 60)
    server = EmbeddedRedis(data_dir)
    url = await server.start()
    try:
        assert url.startswith("redis://:") and "@127.0.0.1:" in url
        # Without the password the server refuses to work.
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        anonymous = aioredis.Redis(host="127.0.0.1", port=port)
        with pytest.raises(Exception, match=r"(?i)auth"):
            await anonymous.set("x", "1")
        await anonymous.aclose()
    finally:
        await server.stop()
    await _roundtrip(data_dir)


async def test_refuses_a_second_server_on_the_same_dir(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path)
    await first.start()
    try:
        with pytest.raises(EmbeddedRedisError, match="already answering"):
            await EmbeddedRedis(tmp_path).start()
    finally:
        await first.stop()


async def test_stop_is_idempotent_and_start_twice_returns_same_url(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    await server.stop()  # never started: nothing to do
    url = await server.start()
    assert await server.start() == url
    await server.stop()
    await server.stop()
    with pytest.raises(EmbeddedRedisError):
        _ = server.url


async def test_missing_binary_says_what_to_install(tmp_path: Path) -> None:
    bogus = str(tmp_path / "no-such-redis-server")
    with pytest.raises(EmbeddedRedisError) as info:
        await EmbeddedRedis(tmp_path / "data", redis_server=bogus).start()
    message = str(info.value)
    assert "redis-server not found on PATH" in message
    assert "apt-get install redis-server" in message
    assert "brew install redis" in message
    assert "redis.url" in message
    assert not (tmp_path / "data").exists(), "nothing should be created before the check"


async def test_child_dying_at_start_reports_its_log(tmp_path: Path) -> None:
    # A "redis-server" that prints a complaint and exits, like a real one with a bad config.
    fake = tmp_path / "fake-redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR: simulated' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(EmbeddedRedisError) as info:
        await EmbeddedRedis(tmp_path / "data", redis_server=str(fake)).start(timeout=5)
    message = str(info.value)
    assert "exited with status 1" in message
    assert "FATAL CONFIG FILE ERROR: simulated" in message
