"""The case study's own comparison: the demo shop in `legacy` mode (sessions written to
PostgreSQL on every request) vs the same shop in `gateway` mode behind the gateway.

The shop lives in examples/fake_web_retailer/ and runs as
`python -m examples.fake_web_retailer --port P --mode legacy|gateway --dsn DSN`.
Its URLs are assumptions kept in the constants below.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from bench import gateway_proc, pgdb
from bench.procs import PYTHON, ROOT, Children, HarnessError, Pinning, free_port, log, wait_port
from bench.procs import start_redis as _start_redis
from bench.sessions import write_cookie_file
from bench.wrk import run_wrk

# A logged-in visitor browsing a product page: the request that, in legacy mode, writes
# the session row (last_activity, current_page, page_views) to PostgreSQL.
SHOP_LOGIN_PATH = "/login"
SHOP_PAGE_PATH = "/products/laptop-123"
# The shop's seeded demo accounts (public on purpose, see its catalog.py); logins cycle
# through them, each login making a session of its own.
SHOP_USERS = (("alice", "alice-password"), ("bob", "bob-password"),
              ("carol", "carol-password"), ("john_doe", "john-password"))  # fmt: skip


def shop_available() -> str | None:
    pkg = ROOT / "examples" / "fake_web_retailer"
    if not (pkg / "__main__.py").exists():
        return "shop not available (examples/fake_web_retailer/__main__.py does not exist yet)"
    return None


async def shop_logins(base_url: str, n: int) -> list[str]:
    """Log n sessions in; return the whole Cookie header each login earned (any names).

    The legacy shop sets its own cookie, the gateway sets `sid`; collecting every
    Set-Cookie keeps this independent of either. A failed login (not a redirect) counts
    as none: the legacy shop sets a cookie even then, for an anonymous session.
    """
    out: list[str] = []
    sem = asyncio.Semaphore(8)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:

        async def one(i: int) -> None:
            user, password = SHOP_USERS[i % len(SHOP_USERS)]
            form = {"username": user, "password": password, "next": "/account"}
            async with sem, http.post(
                f"{base_url}{SHOP_LOGIN_PATH}", data=form, allow_redirects=False
            ) as resp:
                await resp.read()
                if resp.status not in (302, 303):
                    return
                jar = "; ".join(f"{k}={m.value}" for k, m in resp.cookies.items() if m.value)
                if jar:
                    out.append(jar)

        await asyncio.gather(*(one(i) for i in range(n)))
    return out


async def _measure_mode(
    mode: str,
    tmp: Path,
    pin: Pinning,
    duration: float,
    connections: int,
    sessions: int,
) -> dict[str, Any]:
    children = Children()
    async with pgdb.throwaway_db("bench_shop") as dsn:
        try:
            shop_port = free_port()
            cmd = [PYTHON, "-m", "examples.fake_web_retailer", "--port", str(shop_port),
                   "--mode", mode, "--dsn", dsn, "--no-access-log"]  # fmt: skip
            shop = children.start(f"shop-{mode}", pin.wrap(cmd, pin.server_cpus), tmp)
            wait_port(shop, shop_port, timeout=30)
            url = f"http://127.0.0.1:{shop_port}"
            if mode == "gateway":
                _, redis_port = _start_redis(children, tmp, pin, "redis-shop")
                gw_port = free_port()
                cfg = gateway_proc.gateway_config(
                    gw_port, redis_port, shop_port, ["set", "logout", "cart"]
                )
                gateway_proc.start_gateway(children, tmp, pin, "gateway-shop", cfg, gw_port)
                url = f"http://127.0.0.1:{gw_port}"
            cookies = await shop_logins(url, sessions)
            log(f"  shop {mode}: {len(cookies)} of {sessions} logins gave cookies")
            if not cookies:
                raise HarnessError(f"no login succeeded on the shop in {mode} mode")
            cookie_file = write_cookie_file(tmp / f"cookies-shop-{mode}.txt", cookies)
            # Let the shop's backends go idle so PostgreSQL flushes their counters
            # (rate-limited to once a second) before the baseline is read.
            await asyncio.sleep(1.5)
            writes_before = await pgdb.write_counters(dsn)
            pids, cpu_before = await pgdb.db_cpu(dsn)
            w = await run_wrk(url, SHOP_PAGE_PATH, cookie_file, tmp, pin, duration, connections)
            pids_after, _ = await pgdb.db_cpu(dsn)
            # Backends that appeared during the load started from zero CPU.
            cpu_after = pgdb.cpu_seconds(sorted(set(pids) | set(pids_after)))
            # Stopping the shop closes its connections; exiting backends flush stats.
            children.stop_all()
            await asyncio.sleep(1.0)
            writes_after = await pgdb.write_counters(dsn)
        finally:
            children.stop_all()
    if w.requests == 0:
        raise HarnessError(f"shop {mode}: no requests completed")
    d: dict[str, Any] = w.as_dict()
    d["logged_in_cookies"] = len(cookies)
    d["db_writes_per_req"] = (writes_after - writes_before) / w.requests
    d["db_cpu_s"] = round(cpu_after - cpu_before, 3)
    d["db_cpu_ms_per_1k"] = (cpu_after - cpu_before) * 1000 / w.requests * 1000
    d["db_backends"] = len(set(pids) | set(pids_after))
    return d


async def run_shop(
    tmp: Path, pin: Pinning, duration: float, connections: int, sessions: int, gateway_ok: bool
) -> dict[str, Any]:
    why = shop_available() or await pgdb.pg_available()
    if why:
        return {"skipped": why}
    out: dict[str, Any] = {}
    for mode in ("legacy", "gateway"):
        if mode == "gateway" and not gateway_ok:
            out[mode] = {"error": "gateway not available"}
            continue
        log(f"shop in {mode} mode: {duration:g} s at max rate")
        try:
            out[mode] = await _measure_mode(mode, tmp, pin, duration, connections, sessions)
        except (HarnessError, OSError, aiohttp.ClientError) as e:
            out[mode] = {"error": str(e).splitlines()[0][:200]}
            log(f"  shop {mode} failed: {e}")
    return out
