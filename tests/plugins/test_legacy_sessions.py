"""legacy_sessions against a real PostgreSQL (tests/postgres.py: a private server, never
the machine's own): import on first visit, one read per legacy session, the negative
cache, the rollout split, the rollback window's writes, the database down, and the
Fake Web Retailer's legacy table as the source. Reads and writes are counted by the
server itself (pg_stat_statements)."""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis
import yaml
from prometheus_client import REGISTRY, generate_latest

import plugins.legacy_sessions  # noqa: F401  (its metrics are registered on import)
from examples.fake_web_retailer.db import SCHEMA
from examples.fake_web_retailer.migrating import legacy_sessions_options
from plugins.legacy.rollout import bucket, chosen

from ..conftest import ROOT, GatewayFactory, RedisServer, Upstream, base_config
from ..postgres import PostgresServer, new_postgres, statement_calls

READ_SQL = "SELECT user_id, username, email FROM sessions WHERE token"
COOKIE = "legacy_sid"


@dataclass
class LegacyTable:
    """The Fake Web Retailer's sessions table on a private database."""

    dsn: str

    async def _conn(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn, timeout=10)

    async def create(self) -> None:
        conn = await self._conn()
        try:
            for statement in SCHEMA[2:]:  # the sessions table and its index
                await conn.execute(statement)
        finally:
            await conn.close()

    async def add(self, user_id: int | None, username: str | None = None, idle: float = 0.0) -> str:
        token = secrets.token_urlsafe(32)
        now = time.time()
        conn = await self._conn()
        try:
            await conn.execute(
                "INSERT INTO sessions (token, user_id, username, email, login_time, "
                "created_at, last_activity) VALUES ($1, $2, $3, $4, $5, $5, $6)",
                token,
                user_id,
                username,
                f"{username}@example.com" if username else None,
                now - idle,
                now - idle,
            )
        finally:
            await conn.close()
        return token

    async def row(self, token: str) -> dict[str, Any] | None:
        conn = await self._conn()
        try:
            r = await conn.fetchrow("SELECT * FROM sessions WHERE token = $1", token)
        finally:
            await conn.close()
        return dict(r) if r is not None else None

    async def reads(self) -> int:
        return await statement_calls(self.dsn, READ_SQL)


@pytest.fixture
async def legacy(pg_dsn: str) -> LegacyTable:
    table = LegacyTable(pg_dsn)
    await table.create()
    return table


def options(dsn: str, **over: Any) -> dict[str, Any]:
    opts = legacy_sessions_options(dsn)
    opts.update(over)
    rollback = opts.get("rollback")
    if isinstance(rollback, dict):
        opts["rollback"] = {**rollback, "flush_interval": 0.05}
    return opts


def cookie(token: str, sid: str | None = None) -> dict[str, str]:
    value = f"{COOKIE}={token}" + (f"; sid={sid}" if sid else "")
    return {"Cookie": value}


def lookups(outcome: str) -> float:
    value = REGISTRY.get_sample_value("gateway_legacy_sessions_lookups_total", {"outcome": outcome})
    return value or 0.0


def reads_counted() -> float:
    return REGISTRY.get_sample_value("gateway_legacy_sessions_db_reads_total") or 0.0


# -- read-through -------------------------------------------------------------------------


async def test_a_legacy_session_is_imported_on_first_visit_and_read_once(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis, legacy: LegacyTable
) -> None:
    token = await legacy.add(1001, "alice")
    gw = await make_gateway(plugins=[{"legacy_sessions": options(legacy.dsn, share_window=0)}])
    resp = await gw.get("/page", headers=cookie(token))
    assert resp.status == 200
    got = upstream.last
    assert got.header("X-Session-Authenticated") == "true"
    assert got.header("X-Session-User-Id") == "1001"
    assert got.header("X-Session-Username") == "alice"
    assert got.header("X-Session-Email") == "alice@example.com"
    # The legacy cookie reaches the backend and is left alone on the client (on_import:
    # keep); the gateway's own cookie is set.
    assert got.header("Cookie") == f"{COOKIE}={token}"
    assert [c.split("=")[0] for c in resp.headers.getall("Set-Cookie")] == ["sid"]
    sid = resp.cookies["sid"].value
    assert rdb.smembers("user_sessions:1001")

    gw.session.cookie_jar.clear()
    for _ in range(5):
        await gw.get("/page", headers=cookie(token, sid))
        assert upstream.last.header("X-Session-User-Id") == "1001"
    # Another browser with the same legacy cookie and no gateway session, later: the
    # legacy session was imported once; it is not read again.
    await gw.get("/page", headers=cookie(token))
    assert upstream.last.header("X-Session-Authenticated") == "false"
    assert await legacy.reads() == 1
    # The database was only read.
    assert await statement_calls(legacy.dsn, "UPDATE") == 0
    assert await statement_calls(legacy.dsn, "INSERT INTO sessions") == 1  # the fixture's


async def test_concurrent_requests_of_one_legacy_session_share_one_read(
    make_gateway: GatewayFactory, upstream: Upstream, legacy: LegacyTable
) -> None:
    token = await legacy.add(1002, "bob")
    opts = options(legacy.dsn)
    # Two gateway processes' worth: separate plugin instances on one Redis.
    gws = [await make_gateway(plugins=[{"legacy_sessions": opts}]) for _ in range(2)]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:

        async def one(i: int) -> int:
            url = gws[i % 2].make_url("/page")
            async with http.get(url, headers=cookie(token)) as resp:
                assert resp.status == 200
                return len(resp.headers.getall("Set-Cookie", []))

        set_cookies = await asyncio.gather(*(one(i) for i in range(20)))
    users = [r.header("X-Session-User-Id") for r in upstream.received]
    assert users == ["1002"] * 20
    assert set_cookies == [1] * 20
    assert await legacy.reads() == 1


async def test_misses_are_remembered_and_junk_is_never_looked_up(
    make_gateway: GatewayFactory, upstream: Upstream, legacy: LegacyTable
) -> None:
    gw = await make_gateway(plugins=[{"legacy_sessions": options(legacy.dsn, negative_ttl=0.5)}])
    unknown = secrets.token_urlsafe(32)
    for _ in range(10):
        assert (await gw.get("/page", headers=cookie(unknown))).status == 200
        assert upstream.last.header("X-Session-Authenticated") == "false"
    assert await legacy.reads() == 1
    # Not the shape of a legacy token: not worth a query at all.
    for junk in ("short", "x" * 300, "a b" * 10, "%00" * 10):
        await gw.get("/page", headers=cookie(junk))
    assert await legacy.reads() == 1
    # Remembered briefly: read again once negative_ttl has passed.
    await asyncio.sleep(0.6)
    await gw.get("/page", headers=cookie(unknown))
    assert await legacy.reads() == 2
    # An expired row and a guest row are no session either (and are read once each).
    expired = await legacy.add(1003, "carol", idle=7200)
    guest = await legacy.add(None)
    for t in (expired, guest, expired, guest):
        await gw.get("/page", headers=cookie(t))
        assert upstream.last.header("X-Session-Authenticated") == "false"
    assert await legacy.reads() == 4


async def test_a_flood_of_unknown_cookies_is_capped_in_reads(
    make_gateway: GatewayFactory, upstream: Upstream, legacy: LegacyTable
) -> None:
    gw = await make_gateway(
        plugins=[{"legacy_sessions": options(legacy.dsn, max_reads_per_second=20)}]
    )
    started = time.monotonic()
    statuses = []
    for _ in range(20):  # ten at a time: the per-address upstream cap is not under test
        statuses += await asyncio.gather(
            *(gw.get("/page", headers=cookie(secrets.token_urlsafe(32))) for _ in range(10))
        )
    elapsed = time.monotonic() - started
    assert [r.status for r in statuses] == [200] * 200
    # A burst of 20, then 20 per second for the time the flood took.
    assert await legacy.reads() <= 20 + 20 * elapsed + 1


# -- rollout ------------------------------------------------------------------------------


async def test_the_rollout_split_is_stable_close_to_the_percentage_and_follows_reload(
    make_gateway: GatewayFactory, upstream: Upstream, legacy: LegacyTable
) -> None:
    known = [await legacy.add(2000 + i, f"user{i}") for i in range(4)]
    tokens = known + [secrets.token_urlsafe(32) for _ in range(296)]
    gw = await make_gateway(plugins=[{"legacy_sessions": options(legacy.dsn, rollout_percent=30)}])
    assert "gateway_legacy_sessions_rollout_percent 30.0" in generate_latest().decode()

    async def sides(client: Any) -> list[bool]:
        """For each token: did the backend get the gateway's session headers?"""
        out = []
        for t in tokens:
            client.session.cookie_jar.clear()
            await client.get("/page", headers=cookie(t))
            out.append(upstream.last.header("X-Session-Authenticated") is not None)
        return out

    first = await sides(gw)
    # Stable: the same visitors, asked again, land on the same side; and the side is
    # the hash's (the legacy cookie of a bypassed request still reaches the backend).
    assert await sides(gw) == first
    assert first == [chosen(t, 30) for t in tokens]
    # Close to the percentage: 300 visitors, 30 % ± 4 standard deviations (~10.6 %).
    assert 0.19 <= sum(first) / len(tokens) <= 0.41

    # A reload rebuilds the chain with the new options: the visitors already on the
    # gateway's sessions stay there, more join.
    gw2 = await make_gateway(plugins=[{"legacy_sessions": options(legacy.dsn, rollout_percent=70)}])
    assert "gateway_legacy_sessions_rollout_percent 70.0" in generate_latest().decode()
    second = await sides(gw2)
    assert all(s for f, s in zip(first, second, strict=True) if f)
    assert 0.59 <= sum(second) / len(tokens) <= 0.81


async def test_visitors_without_a_legacy_cookie(
    make_gateway: GatewayFactory, upstream: Upstream, legacy: LegacyTable
) -> None:
    from ..conftest import login

    gw = await make_gateway(
        plugins=[{"legacy_sessions": options(legacy.dsn, rollout_percent=50, rollback=None)}]
    )
    # New visitor: to the legacy app, whose cookie will then decide.
    await gw.get("/page")
    assert upstream.last.header("X-Session-Authenticated") is None
    # A visitor the gateway already holds a session for stays with it (logged in while
    # the rollout was at 100 %).
    full = await make_gateway(plugins=[{"legacy_sessions": options(legacy.dsn, rollback=None)}])
    sid = await login(full, upstream, "9")
    gw.session.cookie_jar.clear()
    await gw.get("/page", headers={"Cookie": f"sid={sid}"})
    assert upstream.last.header("X-Session-User-Id") == "9"
    # 0 %: the gateway's sessions are off for everyone.
    off = await make_gateway(
        plugins=[{"legacy_sessions": options(legacy.dsn, rollout_percent=0, rollback=None)}]
    )
    await off.get("/page", headers={"Cookie": f"sid={sid}"})
    assert upstream.last.header("X-Session-Authenticated") is None


# -- rollback window ----------------------------------------------------------------------


async def test_logins_and_logouts_are_written_to_the_legacy_table(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis, legacy: LegacyTable
) -> None:
    guest = await legacy.add(None)  # the visitor's legacy session before logging in
    gw = await make_gateway(plugins=[{"legacy_sessions": options(legacy.dsn, rollout_percent=50)}])
    while not chosen(guest, 50):  # a visitor the rollout sends to the gateway
        guest = await legacy.add(None)
    upstream.reply_headers("/login", ("X-Session-Login", "user_id=42; username=ann"))
    resp = await gw.post("/login", headers=cookie(guest))
    assert resp.status == 200
    new = resp.cookies[COOKIE].value
    sid = resp.cookies["sid"].value
    assert new != guest
    # The new legacy cookie keeps the visitor on their side of the rollout.
    assert bucket(new) == bucket(guest)
    row = await wait_for_row(legacy, new)
    assert (row["user_id"], row["username"]) == (42, "ann")
    await wait_for_gone(legacy, guest)  # the legacy session the login replaced

    # Activity never reaches the database.
    gw.session.cookie_jar.clear()
    for _ in range(10):
        await gw.get("/page", headers=cookie(new, sid))
        assert upstream.last.header("X-Session-User-Id") == "42"
    await asyncio.sleep(0.3)
    assert (await legacy.row(new)) == row
    assert await statement_calls(legacy.dsn, "UPDATE") == 0

    # Turned off: the visitor goes to the legacy app with a cookie it knows.
    off = await make_gateway(plugins=[{"legacy_sessions": options(legacy.dsn, rollout_percent=0)}])
    await off.get("/page", headers=cookie(new, sid))
    assert upstream.last.header("X-Session-Authenticated") is None
    assert upstream.last.header("Cookie") == f"{COOKIE}={new}"

    # A logout through the gateway ends the legacy session too.
    upstream.reply_headers("/page", ("X-Session-Logout", "this"))
    await gw.get("/page", headers=cookie(new, sid))
    await wait_for_gone(legacy, new)
    upstream.reply_headers("/page")
    # And the legacy cookie brings no one back.
    await gw.get("/page", headers=cookie(new))
    assert upstream.last.header("X-Session-Authenticated") == "false"
    assert not rdb.keys("legacy:{*")


async def test_logout_everywhere_ends_every_legacy_session_of_the_user(
    make_gateway: GatewayFactory, upstream: Upstream, legacy: LegacyTable
) -> None:
    imported = await legacy.add(77, "zed")
    gw = await make_gateway(plugins=[{"legacy_sessions": options(legacy.dsn)}])
    resp = await gw.get("/page", headers=cookie(imported))
    sid_imported = resp.cookies["sid"].value
    upstream.reply_headers("/login", ("X-Session-Login", "user_id=77; username=zed"))
    gw.session.cookie_jar.clear()
    resp = await gw.post("/login")
    logged = resp.cookies[COOKIE].value
    await wait_for_row(legacy, logged)
    upstream.reply_headers("/page", ("X-Session-Logout", "all"))
    gw.session.cookie_jar.clear()
    await gw.get("/page", headers={"Cookie": f"sid={sid_imported}"})
    await wait_for_gone(legacy, logged)
    await wait_for_gone(legacy, imported)


async def wait_for_row(legacy: LegacyTable, token: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        row = await legacy.row(token)
        if row is not None:
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"no legacy row {token}")


async def wait_for_gone(legacy: LegacyTable, token: str) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if await legacy.row(token) is None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"legacy row {token} still there")


# -- the database down --------------------------------------------------------------------


@pytest.fixture
async def own_postgres() -> AsyncIterator[PostgresServer]:
    srv = new_postgres()
    yield srv
    srv.remove()


async def test_database_down_skips_the_source_and_never_fails_a_request(
    make_gateway: GatewayFactory,
    upstream: Upstream,
    own_postgres: PostgresServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = await own_postgres.create_database()
    legacy = LegacyTable(own_postgres.dsn(name))
    await legacy.create()
    alice = await legacy.add(1001, "alice")
    bob = await legacy.add(1002, "bob")
    gw = await make_gateway(
        plugins=[{"legacy_sessions": options(legacy.dsn, retry_after=0.5, timeout=0.5)}]
    )
    assert (await gw.get("/page", headers=cookie(alice))).status == 200
    assert upstream.last.header("X-Session-User-Id") == "1001"

    own_postgres.stop()
    caplog.clear()
    errors, downs = lookups("db-error"), lookups("db-down")
    gw.session.cookie_jar.clear()
    started = time.monotonic()
    for _ in range(5):
        resp = await gw.get("/page", headers=cookie(bob))
        assert resp.status == 200
        assert upstream.last.header("X-Session-Authenticated") == "false"
    assert time.monotonic() - started < 2.0
    # One failed read, then the source is skipped until retry_after has passed.
    assert (lookups("db-error") - errors, lookups("db-down") - downs) == (1, 4)
    assert not [r for r in caplog.records if r.exc_info]
    # A login meanwhile stands; its legacy row waits for the database.
    upstream.reply_headers("/login", ("X-Session-Login", "user_id=5; username=eve"))
    resp = await gw.post("/login")
    assert resp.status == 200
    waiting = resp.cookies[COOKIE].value

    own_postgres.start()
    await asyncio.sleep(0.6)
    gw.session.cookie_jar.clear()
    await gw.get("/page", headers=cookie(bob))
    assert upstream.last.header("X-Session-User-Id") == "1002"
    await wait_for_row(legacy, waiting)
    assert not [r for r in caplog.records if r.exc_info]


async def test_a_slow_database_is_cut_at_the_timeout(
    make_gateway: GatewayFactory, upstream: Upstream, legacy: LegacyTable
) -> None:
    alice = await legacy.add(1001, "alice")
    slow = options(legacy.dsn, timeout=0.3)
    slow["query"] = {
        "sql": "SELECT user_id, username, email FROM sessions, pg_sleep(3) WHERE token = $1",
        "params": ["token"],
    }
    gw = await make_gateway(plugins=[{"legacy_sessions": slow}])
    started = time.monotonic()
    resp = await gw.get("/page", headers=cookie(alice))
    assert resp.status == 200
    assert upstream.last.header("X-Session-Authenticated") == "false"
    assert time.monotonic() - started < 2.0


async def test_the_gateway_starts_with_the_database_down(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    from ..conftest import free_port

    reads = reads_counted()
    gw = await make_gateway(
        plugins=[{"legacy_sessions": options(f"postgresql://postgres@127.0.0.1:{free_port()}/x")}]
    )
    resp = await gw.get("/page", headers=cookie(secrets.token_urlsafe(32)))
    assert resp.status == 200
    assert reads_counted() == reads + 1


# -- the cut-over report ------------------------------------------------------------------


async def test_migrate_status_reports_the_cut_over(
    make_gateway: GatewayFactory,
    upstream: Upstream,
    redis_server: RedisServer,
    legacy: LegacyTable,
    tmp_path: Path,
) -> None:
    tokens = [await legacy.add(3000 + i, f"u{i}") for i in range(3)]
    await legacy.add(None)  # a guest: not counted as a live legacy session
    cfg = base_config(
        redis_server.url, upstream.url, plugins=[{"legacy_sessions": options(legacy.dsn)}]
    )
    gw = await make_gateway(cfg)
    await gw.get("/page", headers=cookie(tokens[0]))
    sid = gw.session.cookie_jar.filter_cookies(gw.make_url("/"))["sid"].value
    for _ in range(3):
        await gw.get("/page", headers=cookie(tokens[0], sid))
    await gw.close()  # the plugin's shutdown adds its last counts to Redis
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "migrate", "status", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    lines = dict(re.split(r"\s{2,}", ln.strip(), maxsplit=1) for ln in out.splitlines()[1:])
    assert "sessions imported" in out and lines.get("sessions imported") == "1", out
    assert lines.get("legacy sessions still active") == "3", out
    assert "avg " in lines["database reads per minute (last hour)"]
    # 1 import + 3 from the gateway's own session = 4 requests.
    share = lines["requests by session source (last hour, 4)"]
    assert "gateway 75.0 %" in share and "legacy 25.0 %" in share, share
    # The old command line still works.
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(path), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "ok" in r.stdout


# -- the Fake Web Retailer's legacy mode as the source ------------------------------------


async def test_the_fake_web_retailers_legacy_sessions_come_through(
    pg_dsn: str, make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    from aiohttp import web

    from examples.fake_web_retailer.app import make_app
    from examples.fake_web_retailer.views import STATE

    runners = []

    async def shop(mode: str) -> tuple[web.Application, str]:
        app = make_app(mode, pg_dsn)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return app, f"http://127.0.0.1:{runner.addresses[0][1]}"

    try:
        _, legacy_url = await shop("legacy")
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            # Logged in to the shop as it was, before the gateway.
            async with http.post(
                legacy_url + "/login",
                data={"username": "alice", "password": "alice-password", "next": "/account"},
            ) as resp:
                assert resp.status == 200 and "alice" in await resp.text()
            await runners.pop().cleanup()

            app, url = await shop("migrating")
            writes = app[STATE].db.session_writes
            cfg = base_config(redis_server.url, url, plugins=[{"legacy_sessions": options(pg_dsn)}])
            gw = await make_gateway(cfg)
            for _ in range(3):
                async with http.get(gw.make_url("/debug/headers")) as resp:
                    seen = await resp.json()
                assert seen["authenticated"] is True
                assert seen["fields"]["username"] == "alice"
                assert seen["headers"]["X-Session-User-Id"] == "1001"
            async with http.get(gw.make_url("/account")) as resp:
                assert resp.status == 200 and "alice" in await resp.text()
            assert app[STATE].db.session_writes == writes  # served from the gateway's
            assert await statement_calls(pg_dsn, READ_SQL) == 1

            # Turned off (0 %): the shop serves the same visitor from its own table.
            off = await make_gateway(
                base_config(
                    redis_server.url,
                    url,
                    plugins=[{"legacy_sessions": options(pg_dsn, rollout_percent=0)}],
                )
            )
            async with http.get(off.make_url("/debug/headers")) as resp:
                seen = await resp.json()
            assert seen["authenticated"] is True and seen["headers"] == {}
            assert app[STATE].db.session_writes == writes + 1  # the legacy touch
    finally:
        for r in runners:
            await r.cleanup()


def test_bad_options_are_refused_at_start() -> None:
    from gateway.chain import validate_plugins
    from gateway.config import ConfigError
    from gateway.testing import settings_for_tests

    def refused(**over: Any) -> str:
        opts = {**options("sqlite:/tmp/x.db"), **over}
        with pytest.raises(ConfigError) as e:
            validate_plugins(settings_for_tests(plugins=[{"legacy_sessions": opts}]))
        return str(e.value)

    assert "SELECT" in refused(query={"sql": "DELETE FROM sessions WHERE token = $1"})
    assert "$2" in refused(query={"sql": "SELECT 1 WHERE $1 = $2", "params": ["token"]})
    assert "gateway's own" in refused(fields={"user_id": "a", "page_views": "b"})
    assert "rollout_percent" in refused(rollout_percent=101)
    assert "dsn" in refused(dsn="mysql://x")
    expire = {"name": COOKIE, "on_import": "expire"}
    assert "rollback needs" in refused(cookie=expire)


async def test_the_configured_query_runs_on_a_read_only_connection(
    make_gateway: GatewayFactory, upstream: Upstream, legacy: LegacyTable
) -> None:
    alice = await legacy.add(1001, "alice")
    errors = lookups("db-error")
    sneaky = options(legacy.dsn)
    # Starts like a read; PostgreSQL refuses its DELETE in a read-only transaction.
    sneaky["query"] = {
        "sql": "WITH gone AS (DELETE FROM sessions RETURNING user_id, username, email) "
        "SELECT * FROM gone WHERE $1 <> ''",
        "params": ["token"],
    }
    gw = await make_gateway(plugins=[{"legacy_sessions": sneaky}])
    assert (await gw.get("/page", headers=cookie(alice))).status == 200
    assert upstream.last.header("X-Session-Authenticated") == "false"
    assert lookups("db-error") == errors + 1
    assert await legacy.row(alice) is not None


async def test_the_legacy_cookie_can_be_expired_on_import(
    make_gateway: GatewayFactory, upstream: Upstream, legacy: LegacyTable
) -> None:
    alice = await legacy.add(1001, "alice")
    opts = options(legacy.dsn, rollback=None)
    opts["cookie"] = {**opts["cookie"], "on_import": "expire", "path": "/shop"}
    gw = await make_gateway(plugins=[{"legacy_sessions": opts}])
    resp = await gw.get("/page", headers=cookie(alice))
    assert upstream.last.header("X-Session-User-Id") == "1001"
    set_cookies = {c.split("=")[0]: c for c in resp.headers.getall("Set-Cookie")}
    assert sorted(set_cookies) == [COOKIE, "sid"]
    expired = set_cookies[COOKIE]
    assert expired.startswith(f"{COOKIE}=; Max-Age=0;") and "Path=/shop" in expired


async def test_a_sqlite_legacy_table_as_the_source(
    make_gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    import sqlite3

    path = tmp_path / "shop.sqlite3"
    conn = sqlite3.connect(path)
    for statement in SCHEMA[2:]:
        conn.execute(statement)
    alice = secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO sessions (token, user_id, username, email, login_time, created_at, "
        "last_activity) VALUES (?, 1001, 'alice', 'a@example.com', ?, ?, ?)",
        (alice, time.time(), time.time(), time.time()),
    )
    conn.commit()
    reads = reads_counted()
    gw = await make_gateway(plugins=[{"legacy_sessions": options(f"sqlite:{path}")}])
    for _ in range(3):
        gw.session.cookie_jar.clear()
        await gw.get("/page", headers=cookie(alice))
    assert upstream.last.header("X-Session-Username") == "alice"
    assert reads_counted() == reads + 1
    # The rollback window's writes go to the same file.
    upstream.reply_headers("/login", ("X-Session-Login", "user_id=7; username=sam"))
    gw.session.cookie_jar.clear()
    new = (await gw.post("/login")).cookies[COOKIE].value
    deadline = time.monotonic() + 5
    row = None
    while row is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        row = conn.execute("SELECT user_id, username FROM sessions WHERE token = ?", (new,))
        row = row.fetchone()
    assert row == (7, "sam")
    conn.close()
