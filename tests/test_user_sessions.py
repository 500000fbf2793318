"""The per-user index user_sessions:<uid>: pruned by logins, capped at
session.max_per_user, and ended by a logout everywhere in bounded steps that a failure
part-way leaves to the next one."""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.crc import key_slot

from gateway import metrics
from gateway.config import parse_settings
from gateway.plugin import Plugin, PluginConfig
from gateway.redis import Keys
from gateway.sessions.store import SessionStore
from gateway.sessions.users import BATCH, SAMPLE

from .conftest import GatewayFactory, RedisServer, Upstream, base_config
from .test_sessions import fresh_login, get_as, is_expiry, sid_cookies, sid_hash, skey


def stale_ids(n: int) -> list[str]:
    """Ids of sessions that expired long ago: in the index, without a hash."""
    return [secrets.token_hex(32) for _ in range(n)]


async def authenticated_as(gw: TestClient, token: str) -> str | None:
    """The user id the backend sees for this cookie (None: no live session)."""
    resp = await get_as(gw, "/whoami", token)
    assert resp.status == 200
    return resp.headers.get("X-Seen-User") or None


@pytest.fixture
def whoami(upstream: Upstream) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(headers={"X-Seen-User": request.headers.get("X-Session-User-Id", "")})

    upstream.routes["/whoami"] = handler


# -- pruning at login -------------------------------------------------------------------------


async def test_login_prunes_ids_of_sessions_that_ended(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    t1 = await fresh_login(gw, upstream, "7")
    t2 = await fresh_login(gw, upstream, "7")
    t3 = await fresh_login(gw, upstream, "7")
    rdb.delete(skey(t1))  # as if it had expired
    rdb.pexpire(skey(t2), 1)  # and this one does expire
    await fresh_login(gw, upstream, "8")  # another user's login does not touch 7's index
    assert rdb.smembers("user_sessions:7") == {sid_hash(t) for t in (t1, t2, t3)}
    t4 = await fresh_login(gw, upstream, "7")
    assert rdb.smembers("user_sessions:7") == {sid_hash(t3), sid_hash(t4)}


async def test_a_bloated_index_shrinks_by_a_bounded_sample_per_login(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis
) -> None:
    # An index grown before this upkeep existed: far more ids than one login checks.
    rdb.sadd("user_sessions:7", *stale_ids(1000))
    rdb.config_set("slowlog-log-slower-than", 0)
    rdb.slowlog_reset()
    token = await fresh_login(gw, upstream, "7")
    # SAMPLE distinct members were checked, all dead but (perhaps) the new one.
    assert 1001 - SAMPLE <= rdb.scard("user_sessions:7") <= 1001 - SAMPLE + 1
    assert rdb.sismember("user_sessions:7", sid_hash(token))
    assert max(command_sizes(slowlog(rdb))) <= SAMPLE + 2


async def test_login_succeeds_when_the_index_upkeep_fails(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis, whoami: None
) -> None:
    # A member whose key is no hash: the upkeep's HGET fails (WRONGTYPE), as a Redis
    # error or timeout after the login's own transaction would.
    rdb.sadd("user_sessions:7", "broken")
    rdb.set("session:broken", "not a hash")
    token = await fresh_login(gw, upstream, "7")
    assert await authenticated_as(gw, token) == "7"
    assert rdb.smembers("user_sessions:7") == {"broken", sid_hash(token)}


# -- the cap ----------------------------------------------------------------------------------

CART_ROUTES = [
    {"path": "/login", "upstream": "app", "session": "optional", "instructions": ["login"]},
    {"path": "/", "upstream": "app", "session": "optional", "instructions": ["cart", "logout"]},
]


async def test_login_beyond_the_cap_ends_the_oldest_sessions_and_their_carts(
    make_gateway: GatewayFactory,
    upstream: Upstream,
    rdb: redis.Redis,
    redis_server: RedisServer,
    whoami: None,
) -> None:
    cfg = base_config(redis_server.url, upstream.url, plugins=["cart"], routes=CART_ROUTES)
    cfg["session"]["max_per_user"] = 3
    gw = await make_gateway(cfg)
    upstream.reply_headers("/add", ("X-Session-Cart-Add", "sku=pen; qty=1; price=2.50"))
    capped = metrics.SESSIONS_CAPPED._value.get()
    tokens = []
    for i in range(5):
        t = await fresh_login(gw, upstream, "9")
        assert (await get_as(gw, "/add", t)).status == 200
        # The user's one cart, shared by the sessions; a per-session cart (kept from
        # before per-user carts) is the session's own and goes with it.
        assert rdb.hget("user_cart:9", "total_items") == str(i + 1)
        rdb.hset(f"cart:{sid_hash(t)}", mapping={"item:old": "old|1|1.00"})
        tokens.append(t)
    gone, kept = tokens[:2], tokens[2:]
    for t in gone:
        assert not rdb.exists(skey(t))
        assert not rdb.exists(f"cart:{sid_hash(t)}")
        assert await authenticated_as(gw, t) is None
    for t in kept:
        assert rdb.exists(f"cart:{sid_hash(t)}")
        assert await authenticated_as(gw, t) == "9"
    assert rdb.hget("user_cart:9", "total_items") == "5"
    assert rdb.smembers("user_sessions:9") == {sid_hash(t) for t in kept}
    assert metrics.SESSIONS_CAPPED._value.get() - capped == 2


# -- logout everywhere ------------------------------------------------------------------------

# Commands that read or free a whole collection at once: on a big index set, each is one
# long block of Redis.
WHOLE_SET = {"SMEMBERS", "SUNION", "SUNIONSTORE", "SINTER", "SINTERSTORE", "SDIFF", "SORT"}


def slowlog(rdb: redis.Redis) -> list[tuple[list[str], str]]:
    """Every command since the last SLOWLOG RESET (threshold 0), oldest first, as
    (arguments, client). Redis 7 logs the commands a script runs too, with client
    "?:0", just before the script's own entry."""
    entries = rdb.execute_command("SLOWLOG", "GET", -1)
    return [(list(e[3]), e[4]) for e in reversed(entries)]


def command_sizes(entries: list[tuple[list[str], str]]) -> list[int]:
    """Arguments of each command, counting those SLOWLOG leaves out (it keeps 32)."""
    sizes = []
    for args, _ in entries:
        n = len(args)
        if args and args[-1].startswith("... (") and args[-1].endswith(" more arguments)"):
            n += int(args[-1].split()[1].lstrip("(")) - 1
        sizes.append(n)
    return sizes


def script_runs(entries: list[tuple[list[str], str]]) -> list[int]:
    """How many commands each script call ran."""
    runs, inner = [], 0
    for args, client in entries:
        if client == "?:0":
            inner += 1
        elif args[0].upper() in ("EVAL", "EVALSHA", "FCALL"):
            runs.append(inner)
            inner = 0
    return runs


async def test_logout_everywhere_of_5000_ids_runs_in_bounded_commands(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis, redis_server: RedisServer
) -> None:
    # No activity flush in the window measured: its script is not what is looked at.
    gw = await make_gateway(activity={"flush_interval": 5})
    tokens = [await fresh_login(gw, upstream, "7") for _ in range(4)]
    other = await fresh_login(gw, upstream, "8")
    rdb.sadd("user_sessions:7", *stale_ids(5000))
    rdb.config_set("slowlog-log-slower-than", 0)
    rdb.config_set("slowlog-max-len", 100_000)
    rdb.slowlog_reset()
    upstream.reply_headers("/bye", ("X-Session-Logout", "all"))
    resp = await get_as(gw, "/bye", tokens[0])
    entries = slowlog(rdb)
    assert resp.status == 200
    cookies = sid_cookies(resp)
    assert len(cookies) == 1 and is_expiry(cookies[0])
    for t in tokens:
        assert not rdb.exists(skey(t))
    assert not rdb.exists("user_sessions:7")
    assert not rdb.exists("user_sessions_ending:7")
    assert rdb.exists(skey(other))
    # Bounded steps, read from SLOWLOG at threshold 0 (every command, with its
    # arguments; durations are not looked at): no command names more than a batch of
    # keys, none reads or deletes a whole set, and no script does more than a few
    # commands (the old logout ran SMEMBERS and 5004 DELs in one script).
    assert len(entries) < 100_000
    names = [args[0].upper() for args, _ in entries]
    assert max(command_sizes(entries)) <= BATCH + 2
    assert not WHOLE_SET & set(names)
    assert not [
        a for a, _ in entries if a[0].upper() in ("DEL", "UNLINK") and "user_sessions:7" in a
    ]
    assert max(script_runs(entries), default=0) <= 5
    # The 5004 ids went in batches: at least 5004 / BATCH steps.
    assert names.count("SRANDMEMBER") >= 5004 // BATCH


class FreezeRedis(Plugin):
    """Stops the test's redis-server (SIGSTOP) in the ``after``-th logout hook: the next
    step of a logout everywhere then times out part-way."""

    class Config(PluginConfig):
        pid: int
        after: int

    calls = 0

    async def sessions_deleted(self, key_ids: list[str]) -> None:
        FreezeRedis.calls += 1
        if FreezeRedis.calls == self.config.after:
            os.kill(self.config.pid, signal.SIGSTOP)


@pytest.fixture
def thaw(redis_server: RedisServer) -> Iterator[None]:
    FreezeRedis.calls = 0
    try:
        yield
    finally:
        assert redis_server.proc is not None
        os.kill(redis_server.proc.pid, signal.SIGCONT)


async def test_logout_everywhere_cut_short_is_a_503_and_the_next_one_finishes_it(
    make_gateway: GatewayFactory,
    upstream: Upstream,
    rdb: redis.Redis,
    redis_server: RedisServer,
    thaw: None,
    whoami: None,
) -> None:
    assert redis_server.proc is not None
    freeze = {"tests.test_user_sessions:FreezeRedis": {"pid": redis_server.proc.pid, "after": 3}}
    gw = await make_gateway(plugins=[freeze])
    tokens = [await fresh_login(gw, upstream, "7") for _ in range(3)]
    rdb.sadd("user_sessions:7", *stale_ids(2000))
    upstream.reply_headers("/bye", ("X-Session-Logout", "all"))
    resp = await get_as(gw, "/bye", tokens[0])
    # Hook 1: this session; hooks 2 and 3: two batches; then Redis stops, and the next
    # step times out.
    assert FreezeRedis.calls == 3
    os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert resp.status == 503
    assert await resp.text() == "session store unavailable; try again\n"
    cookies = sid_cookies(resp)
    assert len(cookies) == 1 and is_expiry(cookies[0])
    assert not rdb.exists(skey(tokens[0]))
    left = rdb.scard("user_sessions_ending:7")
    assert 0 < left <= 2002 - 2 * BATCH
    assert 0 < rdb.ttl("user_sessions_ending:7") <= 3600
    # The user logs in again (a fresh index) and logs out everywhere again.
    again = await fresh_login(gw, upstream, "7")
    assert rdb.smembers("user_sessions:7") == {sid_hash(again)}
    resp = await get_as(gw, "/bye", again)
    assert resp.status == 200
    for t in [*tokens, again]:
        assert not rdb.exists(skey(t))
        assert await authenticated_as(gw, t) is None
    assert not rdb.exists("user_sessions:7")
    assert not rdb.exists("user_sessions_ending:7")


async def test_logout_everywhere_finishes_an_ending_set_left_by_a_crash(
    gw: TestClient, upstream: Upstream, rdb: redis.Redis, whoami: None
) -> None:
    t1, t2, t3 = [await fresh_login(gw, upstream, "7") for _ in range(3)]
    # A logout everywhere that crashed after moving the index aside (t2, t3 among it),
    # before a login that made t4.
    rdb.srem("user_sessions:7", sid_hash(t2), sid_hash(t3))
    rdb.sadd("user_sessions_ending:7", sid_hash(t2), sid_hash(t3), *stale_ids(250))
    rdb.expire("user_sessions_ending:7", 3600)
    t4 = await fresh_login(gw, upstream, "7")
    other = await fresh_login(gw, upstream, "8")
    upstream.reply_headers("/bye", ("X-Session-Logout", "all"))
    resp = await get_as(gw, "/bye", t1)
    assert resp.status == 200
    for t in (t1, t2, t3, t4):
        assert await authenticated_as(gw, t) is None
        assert not rdb.exists(skey(t))
    assert not rdb.exists("user_sessions:7")
    assert not rdb.exists("user_sessions_ending:7")
    assert await authenticated_as(gw, other) == "8"


# -- the store, step by step ------------------------------------------------------------------


@pytest.fixture
async def aredis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    r = Redis(port=redis_server.port, decode_responses=True)
    yield r
    await r.aclose()


def store_for(aredis: Redis, keys: Keys, **session: Any) -> SessionStore:
    cfg = base_config("redis://127.0.0.1:1/0", "http://127.0.0.1:1")
    cfg["session"].update(session)
    return SessionStore(aredis, parse_settings(cfg).session, keys, timeout=2.0)


@pytest.mark.parametrize("hash_tags", [False, True], ids=["plain", "hash-tags"])
async def test_a_login_after_the_move_survives_the_logout_everywhere(
    aredis: Redis, rdb: redis.Redis, hash_tags: bool
) -> None:
    keys = Keys(hash_tags=hash_tags)
    store = store_for(aredis, keys)
    current, _ = await store.login(None, {"user_id": "a:b"})
    earlier = [(await store.login(None, {"user_id": "a:b"}))[0] for _ in range(2)]
    user_set, ending = keys.user_sessions("a:b"), keys.user_sessions_ending("a:b")
    rdb.sadd(user_set, *stale_ids(3 * BATCH))
    steps = store.logout(current, everywhere=True)
    assert await anext(steps) == [current.key_id]
    first = await anext(steps)  # the index has been moved aside by now
    assert len(first) == BATCH
    assert not rdb.exists(user_set) and rdb.exists(ending)
    later, ended = await store.login(None, {"user_id": "a:b"})
    assert ended == []
    rest = [ids async for ids in steps]
    assert all(len(ids) <= BATCH for ids in rest)
    done = {x for ids in [first, *rest] for x in ids}
    assert {s.key_id for s in earlier} <= done and later.key_id not in done
    assert len(done) == 3 * BATCH + 2
    for s in [current, *earlier]:
        assert not rdb.exists(keys.session(s.key_id))
    assert rdb.exists(keys.session(later.key_id))
    assert rdb.smembers(user_set) == {later.key_id}
    assert not rdb.exists(ending)


def test_index_names() -> None:
    plain, tagged = Keys(), Keys("app:", hash_tags=True)
    # The index's name is contract; the ending set's is no index name of any user.
    assert plain.user_sessions("7") == "user_sessions:7"
    assert not plain.user_sessions_ending("a").startswith("user_sessions:")
    assert tagged.user_sessions("7") == "app:user_sessions:{u:7}"
    for uid in ("7", "a:b", "x{y", "p}q", "user_sessions:7"):
        # RENAMENX needs both in one slot under Redis Cluster.
        assert key_slot(tagged.user_sessions(uid).encode()) == key_slot(
            tagged.user_sessions_ending(uid).encode()
        )
