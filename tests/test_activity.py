"""Write-behind activity: coalescing, bounds, retries without double counting, SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any
from unittest.mock import ANY

import pytest
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from gateway import metrics
from gateway.app import RUNTIME
from gateway.config import ActivitySettings
from gateway.sessions import activity, public_id
from gateway.sessions.activity import ActivityWriter

from .conftest import (
    RedisServer,
    Upstream,
    base_config,
    free_port,
    login,
    start_backend,
    wait_for,
)


def _key(token: str) -> str:
    return f"session:{public_id(token)}"


async def test_activity_is_recorded_and_coalesced(
    make_gateway: Any, redis_server: RedisServer, upstream: Upstream, rdb: redis.Redis
) -> None:
    # Without the near-cache, so that every request reads its session from Redis, and
    # with the longest flush interval: the test flushes itself.
    session = {"cookie": {"name": "sid", "secure": False}, "near_cache": {"enabled": False}}
    gw = await make_gateway(session=session, activity={"flush_interval": 5})
    token = await login(gw, upstream)
    rdb.config_resetstat()
    for i in range(30):
        assert (await gw.get(f"/page/{i}")).status == 200
    key = _key(token)
    assert await gw.server.app[RUNTIME].sessions.activity.flush()
    assert rdb.hget(key, "page_views") == "30"
    assert rdb.hget(key, "current_page") == "/page/29"
    assert float(rdb.hget(key, "last_activity") or 0) > time.time() - 10
    stats = rdb.info("commandstats")
    hgetall = stats.get("cmdstat_hgetall", {}).get("calls", 0)
    evalsha = stats.get("cmdstat_evalsha", {}).get("calls", 0)
    assert hgetall == 30  # one read per request
    # 30 requests' activity went out as one script call (two if a timed flush fell
    # inside the loop), carrying the session once per script run: coalesced, not 30
    # entries.
    assert 1 <= evalsha <= 2
    assert 1 <= stats.get("cmdstat_hincrby", {}).get("calls", 0) <= 2


async def test_ttl_slides_but_not_past_absolute_deadline(
    make_gateway: Any, redis_server: RedisServer, upstream: Upstream, rdb: redis.Redis
) -> None:
    cfg = base_config(redis_server.url, upstream.url)
    cfg["session"].update(idle_ttl=100, absolute_ttl=200)
    client = await make_gateway(cfg)
    token = await login(client, upstream)
    key = _key(token)
    # Pretend the login was 150 s ago: 50 s of absolute lifetime remain.
    rdb.hset(key, "login_time", f"{time.time() - 150:.3f}")
    rdb.expire(key, 5)
    await client.get("/p")
    await wait_for(lambda: rdb.hget(key, "current_page") == "/p")
    assert 40 <= rdb.ttl(key) <= 50


def test_buffer_is_bounded_and_drops_oldest() -> None:
    async def run() -> None:
        r = aioredis.Redis(port=1)  # never contacted
        w = ActivityWriter(r, ActivitySettings(max_pending=3), idle_ttl=60)
        before = metrics.ACTIVITY_DROPPED._value.get()
        for i in range(5):
            w.record(f"session:{i}", "/", time.time() + 60)
        w.record("session:4", "/again", time.time() + 60)  # coalesces, drops nothing
        assert w.pending_count() == 3
        assert list(w._pending) == ["session:2", "session:3", "session:4"]
        assert w._pending["session:4"].views == 2
        assert metrics.ACTIVITY_DROPPED._value.get() - before == 2
        await r.aclose()

    asyncio.run(run())


async def test_steady_traffic_keeps_the_flush_interval(
    redis_server: RedisServer, rdb: redis.Redis
) -> None:
    """Activity arriving during every flush is not a failure: the writer must not back
    off as if Redis were down (it did, stretching the interval to max_backoff)."""
    rdb.hset("session:s", mapping={"login_time": f"{time.time():.3f}", "page_views": "0"})
    r = aioredis.Redis(port=redis_server.port)
    w = ActivityWriter(r, ActivitySettings(flush_interval=0.05, max_backoff=5), idle_ttl=60)
    before = metrics.ACTIVITY_FLUSHES.labels("ok")._value.get()
    w.start()
    deadline = time.time() + 3600
    views = 0
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        # A request on every turn of the loop, so some always arrive during a flush.
        w.record("session:s", "/steady", deadline)
        views += 1
        await asyncio.sleep(0)
    flushes = metrics.ACTIVITY_FLUSHES.labels("ok")._value.get() - before
    # 1.5 s at 0.05 s is ~30 flushes; backing off (0.05, 0.1, 0.2, 0.4, 0.8 s) gives 5.
    assert flushes >= 12, flushes
    await w.stop()
    assert rdb.hget("session:s", "page_views") == str(views)
    await r.aclose()


async def test_unflushed_activity_is_unknown_once_its_batch_was_sent() -> None:
    """What a session read may add on top of Redis: nothing it cannot be sure of. A sent
    batch that failed (a timeout may still have been applied) makes it unknown."""
    r = aioredis.Redis(port=free_port(), socket_connect_timeout=0.2)  # nothing listens
    w = ActivityWriter(r, ActivitySettings(flush_timeout=0.5), idle_ttl=60)
    deadline = time.time() + 3600
    w.record("session:a", "/1", deadline)
    w.record("session:a", "/2", deadline)

    def overlaid(key: str) -> dict[str, str] | None:
        fields = {"page_views": "10", "current_page": "/old"}
        return fields if w.apply_unflushed(key, fields) else None

    assert overlaid("session:a") == {"page_views": "12", "current_page": "/2",
                                     "last_activity": ANY}  # fmt: skip
    assert overlaid("session:other") == {"page_views": "10", "current_page": "/old"}
    assert await w.flush() is False  # sent, refused: kept for retry
    w.record("session:a", "/3", deadline)
    w.record("session:b", "/b", deadline)
    assert overlaid("session:a") is None
    assert overlaid("session:b") == {"page_views": "11", "current_page": "/b",
                                     "last_activity": ANY}  # fmt: skip
    await r.aclose()


async def test_failed_flush_is_retried_and_merged_without_double_count(
    redis_server: RedisServer, rdb: redis.Redis
) -> None:
    rdb.hset("session:a", mapping={"login_time": f"{time.time():.3f}", "page_views": "0"})
    r = aioredis.Redis(port=redis_server.port, socket_timeout=0.3, socket_connect_timeout=0.3)
    w = ActivityWriter(r, ActivitySettings(flush_timeout=0.3), idle_ttl=60)
    deadline = time.time() + 3600
    for _ in range(3):
        w.record("session:a", "/one", deadline)
    redis_server.kill()
    assert await w.flush() is False  # Redis is gone: kept for retry
    w.record("session:a", "/two", deadline)  # newer update while the batch waits
    redis_server.start()  # same port, empty dataset
    rdb.hset("session:a", mapping={"login_time": f"{time.time():.3f}", "page_views": "0"})
    assert await w.flush() is True
    assert rdb.hget("session:a", "page_views") == "4"
    assert rdb.hget("session:a", "current_page") == "/two"
    await r.aclose()


async def test_buffer_count_holds_through_an_outage(
    redis_server: RedisServer, rdb: redis.Redis
) -> None:
    """pending_count() is kept as batches wait, lose sessions (a logout, the cap) and go
    out, not summed over them on every request: it must equal what is really buffered
    at every step, and max_pending must hold while Redis is down."""
    r = aioredis.Redis(port=redis_server.port, socket_timeout=0.3, socket_connect_timeout=0.3)
    w = ActivityWriter(r, ActivitySettings(flush_timeout=0.3, max_pending=450), idle_ttl=60)
    deadline = time.time() + 3600

    def check(expected: int) -> None:
        really = len(w._pending) + sum(len(b.entries) for b in w._retry)
        assert w.pending_count() == really == expected

    for i in range(300):
        w.record(f"session:{i}", "/a", deadline)
    redis_server.kill()
    assert await w.flush() is False  # two batches (200 + 100) wait
    check(300)
    for i in (0, 1, 250, 299):
        w.discard(f"session:{i}")  # logged out while its batch waits
    w.discard("session:none")
    check(296)
    for i in range(300, 500):
        w.record(f"session:{i}", "/b", deadline)  # past the cap: the oldest go
    check(450)
    assert await w.flush() is False
    check(450)
    redis_server.start()  # same port, empty dataset
    # 296 waiting + 200 new is 46 past the cap: sessions 2..47 (0 and 1 left) went.
    kept = [f"session:{i}" for i in range(48, 500) if i not in (250, 299)]
    for k in kept:
        rdb.hset(k, mapping={"login_time": f"{time.time():.3f}", "page_views": "0"})
    assert await w.flush() is True
    check(0)
    assert sum(int(rdb.hget(k, "page_views") or 0) for k in kept) == len(kept) == 450
    await r.aclose()


async def test_ambiguous_timeout_is_not_counted_twice(
    redis_server: RedisServer, rdb: redis.Redis
) -> None:
    """The flush times out while Redis is busy but Redis applies it afterwards; the retry
    carries the same batch id and is skipped."""
    rdb.hset("session:b", mapping={"login_time": f"{time.time():.3f}", "page_views": "0"})
    r = aioredis.Redis(port=redis_server.port, socket_timeout=5)
    w = ActivityWriter(r, ActivitySettings(flush_timeout=0.3), idle_ttl=60)
    await r.script_load(activity._SCRIPT.source)  # so the first EVALSHA is the one that stalls
    for _ in range(5):
        w.record("session:b", "/x", time.time() + 3600)
    sleeper = threading.Thread(
        target=lambda: redis.Redis(port=redis_server.port).execute_command("DEBUG", "SLEEP", "1")
    )
    sleeper.start()
    await asyncio.sleep(0.1)
    assert await w.flush() is False  # timed out; the command is still queued in Redis
    await asyncio.to_thread(sleeper.join)
    await wait_for(lambda: rdb.hget("session:b", "page_views") == "5")
    assert await w.flush() is True  # the retry: same id, skipped by the script
    assert rdb.hget("session:b", "page_views") == "5"
    await r.aclose()


async def test_activity_never_resurrects_a_logged_out_session(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    token = await login(gw, upstream)
    await gw.get("/before")
    upstream.reply_headers("/bye", ("X-Session-Logout", "this"))
    await gw.get("/bye")
    # A request that resolved the session just before the logout records its activity
    # just after it (the logout itself discarded what was buffered): the flush must not
    # write it into a hash that is gone.
    writer = gw.server.app[RUNTIME].sessions.activity
    writer.record(_key(token), "/late", time.time() + 3600)
    assert await writer.flush()
    assert not rdb.exists(_key(token))


def test_sigterm_flushes_buffered_activity(
    gateway_process: Any, redis_server: RedisServer, rdb: redis.Redis
) -> None:
    import aiohttp
    from aiohttp import web

    async def scenario() -> None:
        async def backend(request: web.Request) -> web.Response:
            r = web.Response(text="ok")
            if request.path == "/login":
                r.headers["X-Session-Login"] = "user_id=5"
            return r

        runner, url = await start_backend(backend)
        cfg = base_config(redis_server.url, url)
        cfg["activity"] = {"flush_interval": 5}  # nothing flushes before the signal
        gp = await asyncio.to_thread(gateway_process, cfg)
        async with aiohttp.ClientSession() as s:
            async with s.post(gp.url + "/login") as resp:
                token = resp.cookies["sid"].value
            for i in range(7):
                async with s.get(gp.url + f"/shop/{i}", cookies={"sid": token}) as resp:
                    assert resp.status == 200
        key = _key(token)
        assert rdb.hget(key, "page_views") == "0"
        gp.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(gp.proc.wait, 20)
        await runner.cleanup()
        assert rc == 0, gp.log()
        assert rdb.hget(key, "page_views") == "7", gp.log()
        assert rdb.hget(key, "current_page") == "/shop/6"
        assert "activity flushed" in gp.log()

    asyncio.run(scenario())


@pytest.mark.security  # also runs under the pure-Python parser, where surrogates appear
async def test_undecodable_path_cannot_stop_the_writer(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    """A request line with bytes that are not UTF-8 is decoded with surrogates by the
    pure-Python parser; its current_page must still be storable, and the writer must
    keep flushing everyone's activity."""
    from .conftest import raw_request

    token = await login(gw, upstream)
    assert gw.port is not None
    await raw_request(
        gw.port,
        b"GET /products/\xff\xfe HTTP/1.1\r\nHost: x\r\nCookie: sid="
        + token.encode()
        + b"\r\nConnection: close\r\n\r\n",
    )
    await gw.get("/after")
    await wait_for(lambda: rdb.hget(_key(token), "current_page") == "/after")
    writer = gw.server.app[RUNTIME].sessions.activity
    assert writer._task is not None and not writer._task.done()
