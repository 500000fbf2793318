"""The near-cache (gateway/nearcache.py) against a real Redis: it saves the session read,
and every way a session can change outside this process reaches it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
from aiohttp.test_utils import TestClient

from gateway import metrics
from gateway.app import RUNTIME
from gateway.sessions import new_token, public_id

from .conftest import GatewayFactory, RedisServer, Upstream, base_config, login, wait_for


def hgetalls(rdb: redis.Redis) -> int:
    return int(rdb.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))


def _cache(client: TestClient) -> Any:
    cache = client.server.app[RUNTIME].sessions.cache
    assert cache is not None
    return cache


def no_expiry(redis_server: RedisServer, upstream: Upstream) -> dict[str, Any]:
    """A config whose entries never age out in a test's time: a change seen then can only
    have come through Redis's invalidation push."""
    cfg = base_config(redis_server.url, upstream.url)
    cfg["session"]["near_cache"] = {"max_age": 3600}
    return cfg


async def cached_gateway(make_gateway: GatewayFactory, **over: Any) -> TestClient:
    client = await make_gateway(**over)
    cache = _cache(client)
    await wait_for(lambda: cache.enabled)
    return client


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    """Whether ``check`` comes true within ``seconds`` (each try is a real request)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.02)
    return False


async def page(client: TestClient, upstream: Upstream, token: str, path: str = "/p") -> str:
    resp = await client.get(path, cookies={"sid": token})
    assert resp.status == 200
    return upstream.last.header("X-Session-Authenticated") or ""


def due_for_renewal(cache: Any, key: str) -> None:
    """Age ``key``'s copy past half of max_age (not past max_age: it is still served)."""
    fields, _ = cache._entries[key]
    cache._entries[key] = (fields, time.monotonic() - 3000)
    assert cache.wants_refresh(key)


def renewed(cache: Any, key: str) -> dict[str, str]:
    copy, stored = cache._entries[key]
    assert time.monotonic() - stored < 3000, "the copy was not renewed"
    return dict(copy)


async def quiesce(gw: TestClient) -> None:
    """Flush by hand and wait for the link's own-write window to close: from here a
    change by another client reaches the cache only through Redis's push, and no call
    of ours is in flight."""
    assert await gw.server.app[RUNTIME].sessions.activity.flush()
    link = gw.server.app[RUNTIME].sessions.link
    await wait_for(lambda: not link._own and not link._pending)


async def flushed_by_hand(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream, **fields: str
) -> tuple[TestClient, Any, Any, str, str]:
    """A gateway whose copies never age out and whose activity is flushed only when the
    test says, with one session (``fields`` given at login) that has one view flushed:
    (client, writer, cache, token, its session key)."""
    cfg = no_expiry(redis_server, upstream)
    cfg["activity"] = {"flush_interval": 5}
    gw = await cached_gateway(make_gateway, config=cfg)
    token = await login(gw, upstream, **fields)
    await page(gw, upstream, token, "/first")
    await quiesce(gw)
    writer = gw.server.app[RUNTIME].sessions.activity
    return gw, writer, _cache(gw), token, f"session:{public_id(token)}"


async def test_repeat_requests_skip_the_session_read(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await cached_gateway(make_gateway)
    token = await login(gw, upstream, user_id="7")
    before = hgetalls(rdb)
    for i in range(20):
        assert await page(gw, upstream, token, f"/p/{i}") == "true"
        assert upstream.last.header("X-Session-User-Id") == "7"
        # Our own activity is mirrored into the cached copy, not lost with it (the
        # header counts the views before this one).
        assert upstream.last.header("X-Session-Page-Views") == str(i)
        await asyncio.sleep(0.01)  # let write-behind flushes happen in between
    assert hgetalls(rdb) - before == 1, "only the first request should read Redis"
    # The flushes went through the link with NOLOOP: they did not evict our entry.
    key = f"session:{public_id(token)}"
    await wait_for(lambda: rdb.hget(key, "page_views") == "20")
    assert await page(gw, upstream, token) == "true"
    assert hgetalls(rdb) - before == 1


async def test_a_change_by_another_client_is_seen(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw, _, _, token, key = await flushed_by_hand(
        make_gateway, redis_server, upstream, user_id="7", tier="bronze"
    )
    await page(gw, upstream, token)
    assert upstream.last.header("X-Session-Tier") == "bronze"
    rdb.hset(key, "tier", "gold")

    async def gold() -> bool:
        await page(gw, upstream, token)
        return upstream.last.header("X-Session-Tier") == "gold"

    assert await eventually(gold, 3.0)


async def test_delete_elsewhere_and_expiry_end_the_cached_session(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await cached_gateway(make_gateway, config=no_expiry(redis_server, upstream))
    deleted = await login(gw, upstream, user_id="1")
    gw.session.cookie_jar.clear()  # or the second login would rotate the first session
    expiring = await login(gw, upstream, user_id="2")
    for t in (deleted, expiring):
        assert await page(gw, upstream, t) == "true"
        assert await page(gw, upstream, t) == "true"  # now served from the cache
    # Logged out by another gateway process (or an operator): the key is deleted.
    await quiesce(gw)  # from here only Redis's push can tell us
    cached = len(_cache(gw))
    rdb.delete(f"session:{public_id(deleted)}")
    await wait_for(lambda: len(_cache(gw)) == cached - 1)
    # Expired by Redis: nothing touches it (a request would slide its TTL), the
    # server's expiry cycle removes it.
    await quiesce(gw)  # the last requests' activity is flushed
    rdb.pexpire(f"session:{public_id(expiring)}", 100)
    await wait_for(lambda: not rdb.exists(f"session:{public_id(expiring)}"))

    for t in (deleted, expiring):

        async def gone(t: str = t) -> bool:
            return await page(gw, upstream, t) == "false"

        assert await eventually(gone, 3.0)


async def test_a_flushdb_empties_the_cache(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await cached_gateway(make_gateway)
    token = await login(gw, upstream)
    assert await page(gw, upstream, token) == "true"
    assert len(_cache(gw)) >= 1
    await quiesce(gw)  # from here only Redis's push can tell us
    rdb.flushdb()
    await wait_for(lambda: len(_cache(gw)) == 0)
    assert await page(gw, upstream, token) == "false"


async def test_cache_is_off_while_the_link_is_down_and_back_after(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await cached_gateway(make_gateway)
    cache = _cache(gw)
    token = await login(gw, upstream)
    await page(gw, upstream, token)
    await page(gw, upstream, token)
    assert len(cache) >= 1
    tracking = [c for c in rdb.client_list() if "t" in c["flags"]]
    assert len(tracking) == 1, "exactly one tracking connection per gateway process"
    # Without the link, nobody would tell us about changes: the cache must stop at once.
    rdb.client_kill_filter(_id=tracking[0]["id"])
    await wait_for(lambda: not cache.enabled, timeout=3)
    assert len(cache) == 0
    before = hgetalls(rdb)
    rdb.hset(f"session:{public_id(token)}", "tier", "silver")
    await page(gw, upstream, token)
    assert upstream.last.header("X-Session-Tier") == "silver"
    # The link comes back by itself and caching resumes.
    await wait_for(lambda: cache.enabled, timeout=5)
    await page(gw, upstream, token)
    await page(gw, upstream, token)
    await page(gw, upstream, token)
    assert hgetalls(rdb) - before <= 3


async def test_a_failed_send_on_the_link_falls_back_to_the_pool(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw, writer, cache, token, key = await flushed_by_hand(make_gateway, redis_server, upstream)
    views = int(rdb.hget(key, "page_views") or -1)
    await page(gw, upstream, token)
    link = gw.server.app[RUNTIME].sessions.link

    async def reset(*args: Any, **kwargs: Any) -> None:
        raise ConnectionResetError("connection reset by peer")

    # The socket died between two reads of the link's reader, so the write fails first
    # (no real server can time that; the rest is real).
    link._conn.send_packed_command = reset
    assert await writer.flush(), "the batch went through the pool"
    assert rdb.hget(key, "page_views") == str(views + 1)
    assert not cache.enabled


async def test_cached_session_is_not_served_when_redis_is_down(
    make_gateway: GatewayFactory,
    redis_server: RedisServer,
    upstream: Upstream,
) -> None:
    cfg = base_config(redis_server.url, upstream.url)
    cfg["activity"] = {"shutdown_timeout": 0.2}  # Redis stays dead through teardown
    gw = await cached_gateway(make_gateway, config=cfg)
    token = await login(gw, upstream)
    await page(gw, upstream, token, "/closed/x")
    await page(gw, upstream, token, "/closed/x")
    assert len(_cache(gw)) >= 1
    redis_server.kill()
    await wait_for(lambda: not _cache(gw).enabled, timeout=3)
    # The route's policy applies (closed: 503), as without a cache.
    resp = await gw.get("/closed/x", cookies={"sid": token})
    assert resp.status == 503


async def test_max_age_bounds_an_entry(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream, rdb: redis.Redis
) -> None:
    cfg = base_config(redis_server.url, upstream.url)
    cfg["session"]["near_cache"] = {"max_age": 0.2}
    cfg["activity"] = {"flush_interval": 5}  # no flush renews the copy meanwhile
    gw = await cached_gateway(make_gateway, config=cfg)
    token = await login(gw, upstream)
    before = hgetalls(rdb)
    await page(gw, upstream, token)
    await page(gw, upstream, token)
    assert hgetalls(rdb) - before == 1
    await asyncio.sleep(0.3)
    await page(gw, upstream, token)
    assert hgetalls(rdb) - before == 2


async def test_a_session_in_use_is_renewed_by_its_flushes_not_read_again(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream, rdb: redis.Redis
) -> None:
    cfg = base_config(redis_server.url, upstream.url)
    cfg["session"]["near_cache"] = {"max_age": 0.4}
    cfg["activity"] = {"flush_interval": 0.05}
    gw = await cached_gateway(make_gateway, config=cfg)
    token = await login(gw, upstream)
    renewed = metrics.NEAR_CACHE_REFRESHES._value.get()
    before = hgetalls(rdb)
    deadline = time.monotonic() + 2.4
    views = []
    while time.monotonic() < deadline:
        assert await page(gw, upstream, token) == "true"
        views.append(int(upstream.last.header("X-Session-Page-Views") or -1))
        await asyncio.sleep(0.03)
    # Each copy would expire within 0.4 s (six or more reads in 2.4 s); the flushes of
    # this session's own activity renew it instead. One read at the start, one spare
    # for a stalled test machine.
    assert hgetalls(rdb) - before <= 2
    assert metrics.NEAR_CACHE_REFRESHES._value.get() > renewed
    # The renewed copies kept every view, including those recorded while a flush was
    # on its way (the header counts the views before the request).
    assert views == list(range(views[0], views[0] + len(views)))


async def test_a_renewed_copy_keeps_the_activity_recorded_during_its_flush(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream, rdb: redis.Redis
) -> None:
    _, writer, cache, _, key = await flushed_by_hand(make_gateway, redis_server, upstream)
    views = int(rdb.hget(key, "page_views") or -1)
    due_for_renewal(cache, key)
    deadline = time.time() + 3600

    def visit(path: str) -> None:  # what record_activity does for a request
        writer.record(key, path, deadline)

    visit("/a")
    flush = asyncio.create_task(writer.flush())
    await asyncio.sleep(0)  # the batch with /a is cut and on its way
    assert not writer._pending
    visit("/b")  # recorded while that flush is in flight
    assert await flush is False  # /b is left for the next one
    assert not writer._retry, "the batch with /a was applied"
    copy = renewed(cache, key)
    assert copy["current_page"] == "/b"
    assert copy["page_views"] == str(views + 2)
    # Redis holds /a until the next flush, after which copy and Redis agree.
    assert rdb.hget(key, "page_views") == str(views + 1)
    assert await writer.flush()
    assert rdb.hget(key, "page_views") == copy["page_views"]
    assert rdb.hget(key, "current_page") == "/b"


async def test_a_renewal_after_failed_flushes_keeps_the_activity_still_waiting(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream, rdb: redis.Redis
) -> None:
    """Redis refuses writes (maxmemory reached) while the link stays up: two failed
    flushes leave two batches of the same session waiting. When the first goes through
    with a renewal, the copy must also carry the second."""
    gw, writer, cache, token, key = await flushed_by_hand(make_gateway, redis_server, upstream)
    rdb.config_set("maxmemory-policy", "noeviction")
    rdb.config_set("maxmemory", "1")
    try:
        await page(gw, upstream, token, "/a")
        assert await writer.flush() is False
        await page(gw, upstream, token, "/b")
        assert await writer.flush() is False
        assert len(writer._retry) == 2
    finally:
        rdb.config_set("maxmemory", "0")
    assert cache.enabled, "the link stayed up"
    due_for_renewal(cache, key)
    assert await writer.flush()
    copy = renewed(cache, key)
    assert rdb.hget(key, "current_page") == "/b"
    assert copy["current_page"] == "/b"
    assert copy["page_views"] == rdb.hget(key, "page_views")


async def test_renewal_works_on_a_redis_without_hrandfield(
    make_gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    """Redis 6.0/6.1 have tracking but no HRANDFIELD: the script falls back to HGETALL
    instead of failing half-way (which would lose the activity of the rest of the
    batch, its id already claimed). Simulated by renaming the command away."""
    (tmp_path / "old").mkdir()
    old = RedisServer(tmp_path / "old", extra_args=("--rename-command", "HRANDFIELD", ""))
    old.start()
    try:
        cfg = base_config(old.url, upstream.url)
        cfg["session"]["near_cache"] = {"max_age": 3600}
        cfg["activity"] = {"flush_interval": 5}
        gw = await cached_gateway(make_gateway, config=cfg)
        writer = gw.server.app[RUNTIME].sessions.activity
        cache = _cache(gw)
        rdb = old.client()
        tokens = []
        for i in range(3):
            gw.session.cookie_jar.clear()  # or each login would rotate the one before
            tokens.append(await login(gw, upstream, user_id=str(i)))
        gw.session.cookie_jar.clear()
        for t in tokens:
            await page(gw, upstream, t, "/first")
        assert await writer.flush()
        keys = [f"session:{public_id(t)}" for t in tokens]
        views = [int(rdb.hget(k, "page_views") or -1) for k in keys]
        due_for_renewal(cache, keys[0])
        for t in tokens:
            await page(gw, upstream, t, "/again")
        assert await writer.flush()
        assert [int(rdb.hget(k, "page_views") or -1) for k in keys] == [v + 1 for v in views]
        assert renewed(cache, keys[0])["page_views"] == str(views[0] + 1)
        rdb.close()
    finally:
        old.kill()


async def test_a_read_after_an_invalidation_keeps_the_unflushed_views(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream, rdb: redis.Redis
) -> None:
    """A copy dropped by another client's change is read again from Redis, which does not
    hold this process's last views yet: the read copy gets them, or the count the
    backend sees would go back and the cached copy would stay short."""
    cfg = no_expiry(redis_server, upstream)
    cfg["activity"] = {"flush_interval": 5}  # nothing is flushed during the test
    gw = await cached_gateway(make_gateway, config=cfg)
    cache = _cache(gw)
    token = await login(gw, upstream)
    seen = []
    for _ in range(3):
        await page(gw, upstream, token)
        seen.append(int(upstream.last.header("X-Session-Page-Views") or -1))
    key = f"session:{public_id(token)}"
    rdb.hset(key, "tier", "gold")  # another client: our copy is invalidated
    await wait_for(lambda: key not in cache._entries)
    for _ in range(2):
        await page(gw, upstream, token)
        seen.append(int(upstream.last.header("X-Session-Page-Views") or -1))
    assert upstream.last.header("X-Session-Tier") == "gold"
    assert seen == list(range(seen[0], seen[0] + 5))
    assert cache._entries[key][0]["page_views"] == str(seen[-1] + 1)


async def test_disabled_reads_every_time(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream, rdb: redis.Redis
) -> None:
    cfg = base_config(redis_server.url, upstream.url)
    cfg["session"]["near_cache"] = {"enabled": False}
    gw = await make_gateway(cfg)
    assert gw.server.app[RUNTIME].sessions.cache is None
    token = await login(gw, upstream)
    before = hgetalls(rdb)
    for _ in range(5):
        await page(gw, upstream, token)
    assert hgetalls(rdb) - before == 5
    assert not [c for c in rdb.client_list() if "t" in c["flags"]]


async def test_a_stalled_redis_turns_the_cache_off_until_it_answers(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream, rdb: redis.Redis
) -> None:
    # Flushed by hand, so no call of ours is in flight to time out instead.
    gw, _, cache, token, _ = await flushed_by_hand(make_gateway, redis_server, upstream)
    # Redis answers nobody for 3 s (the connection stays open): the heartbeat, not a
    # closed socket, must notice that invalidations may not be arriving.
    stall = asyncio.create_task(asyncio.to_thread(rdb.execute_command, "DEBUG", "SLEEP", "3"))
    await wait_for(lambda: not cache.enabled, timeout=2.5)
    await stall
    await wait_for(lambda: cache.enabled, timeout=5)
    assert await page(gw, upstream, token) == "true"


def stored_session(rdb: redis.Redis) -> str:
    """A logged-in session written straight into Redis (a login under redis.wait needs
    a replica to acknowledge it); its token."""
    now = f"{time.time():.3f}"
    token = new_token()
    rdb.hset(
        f"session:{public_id(token)}",
        mapping={"user_id": "5", "login_time": now, "last_activity": now, "page_views": "0"},
    )
    return token


async def test_reads_do_not_wait_behind_a_flush_wait(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream, rdb: redis.Redis
) -> None:
    """With redis.wait, each activity flush sends WAIT on the link, and Redis holds it
    until enough replicas answer or wait.timeout ends (here there is no replica: all of
    it). A session read meanwhile goes through the pool instead of queueing behind the
    WAIT on the link, and the cache stays on."""
    cfg = no_expiry(redis_server, upstream)
    cfg["redis"]["timeout"] = 1.5
    cfg["redis"]["wait"] = {"replicas": 1, "timeout": 1.0}
    gw = await cached_gateway(make_gateway, config=cfg)
    cache = _cache(gw)
    epoch = cache._epoch  # moves each time the cache goes off or on
    tokens = [stored_session(rdb) for _ in range(2)]
    short = metrics.REDIS_WAITS.labels("short")._value.get()

    def waiting() -> bool:
        return any(c.get("cmd") == "wait" for c in rdb.client_list())

    assert await page(gw, upstream, tokens[0]) == "true"
    await wait_for(waiting)  # the flush of that page view holds the link in WAIT
    assert await page(gw, upstream, tokens[1]) == "true"
    assert waiting(), "the read came back only once the WAIT had ended"
    await wait_for(lambda: metrics.REDIS_WAITS.labels("short")._value.get() > short, 5)
    assert cache.enabled and cache._epoch == epoch, "the link was dropped during the WAIT"


async def test_the_link_outlasts_a_wait_longer_than_its_heartbeat(
    make_gateway: GatewayFactory, redis_server: RedisServer, upstream: Upstream, rdb: redis.Redis
) -> None:
    """A WAIT held longer than twice the link's heartbeat (1 s) is no dead link: the
    probe's answer waits behind it. The link took it for one and the cache went off and
    on around every flush while the replicas were slow."""
    cfg = no_expiry(redis_server, upstream)
    cfg["redis"]["timeout"] = 4.0
    cfg["redis"]["wait"] = {"replicas": 1, "timeout": 2.5}
    cfg["activity"] = {"flush_interval": 0.05, "flush_timeout": 3.5}
    gw = await cached_gateway(make_gateway, config=cfg)
    cache = _cache(gw)
    epoch = cache._epoch  # moves each time the cache goes off or on
    token = stored_session(rdb)
    short = metrics.REDIS_WAITS.labels("short")._value.get()
    assert await page(gw, upstream, token) == "true"
    await wait_for(lambda: metrics.REDIS_WAITS.labels("short")._value.get() > short, 6)
    assert cache.enabled and cache._epoch == epoch, "the cache went off during the WAIT"
