"""Redis trouble: a route's on_redis_error decides; nothing hangs, nothing is a 500, and
the gateway reconnects by itself."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest
import redis
from aiohttp.test_utils import TestClient

from .conftest import RedisServer, Upstream, login

# A guard against hangs, not a performance assertion: Redis calls time out at 0.5 s.
HANG = 5.0


async def get(client: TestClient, path: str, **kw: object) -> tuple[int, dict[str, str], str]:
    async with asyncio.timeout(HANG):
        resp = await client.get(path, **kw)  # type: ignore[arg-type]
        return resp.status, dict(resp.headers), await resp.text()


async def test_redis_killed_and_restarted(
    gw: TestClient, upstream: Upstream, redis_server: RedisServer
) -> None:
    await login(gw, upstream, "8")
    status, _, _ = await get(gw, "/home")
    assert status == 200
    assert upstream.last.header("X-Session-Authenticated") == "true"

    redis_server.kill()
    # open: proxied as anonymous
    status, _, body = await get(gw, "/home")
    assert status == 200
    assert upstream.last.header("X-Session-Authenticated") == "false"
    assert upstream.last.header("X-Session-User-Id") is None
    # closed: 503 with Retry-After, the upstream is not called
    n = len(upstream.received)
    status, headers, body = await get(gw, "/closed/x")
    assert status == 503 and headers["Retry-After"].isdigit()
    assert "Traceback" not in body
    assert len(upstream.received) == n
    # a login during the outage answers 503 rather than losing the session
    upstream.reply_headers("/login", ("X-Session-Login", "user_id=9"))
    async with asyncio.timeout(HANG):
        resp = await gw.post("/login")
    assert resp.status == 503
    assert "sid=" not in resp.headers.get("Set-Cookie", "")

    # Nor is a logout answered 200: the session the cookie names may still be alive.
    # The cookie is expired all the same.
    upstream.reply_headers("/bye", ("X-Session-Logout", "this"))
    async with asyncio.timeout(HANG):
        resp = await gw.get("/bye")
    assert resp.status == 503
    assert "sid=;" in resp.headers.get("Set-Cookie", "")

    redis_server.start()  # same port; this test Redis keeps no data
    token = await login(gw, upstream, "9")
    status, _, _ = await get(gw, "/again", cookies={"sid": token})
    assert status == 200
    assert upstream.last.header("X-Session-User-Id") == "9"


@pytest.fixture
def stopped(redis_server: RedisServer) -> Iterator[RedisServer]:
    yield redis_server
    if redis_server.proc is not None:
        os.kill(redis_server.proc.pid, signal.SIGCONT)


async def test_stalled_redis_times_out_instead_of_hanging(
    gw: TestClient, upstream: Upstream, stopped: RedisServer, rdb: redis.Redis
) -> None:
    token = await login(gw, upstream, "10")
    assert stopped.proc is not None
    os.kill(stopped.proc.pid, signal.SIGSTOP)  # accepts nothing, answers nothing
    status, _, _ = await get(gw, "/home", cookies={"sid": token})
    assert status == 200
    assert upstream.last.header("X-Session-Authenticated") == "false"
    status, _, _ = await get(gw, "/closed/y", cookies={"sid": token})
    assert status == 503
    os.kill(stopped.proc.pid, signal.SIGCONT)

    async def back() -> bool:
        _status, _, _ = await get(gw, "/home", cookies={"sid": token})
        return upstream.last.header("X-Session-User-Id") == "10"

    for _ in range(50):
        if await back():
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("sessions did not come back after Redis resumed")


async def test_redis_down_at_start_then_up(
    make_gateway: object, redis_server: RedisServer, upstream: Upstream
) -> None:
    redis_server.kill()
    client: TestClient = await make_gateway()  # type: ignore[operator]
    status, _, _ = await get(client, "/home")
    assert status == 200
    redis_server.start()
    token = await login(client, upstream, "11")
    status, _, _ = await get(client, "/home", cookies={"sid": token})
    assert upstream.last.header("X-Session-User-Id") == "11"
