"""The session store alone: session updates/s on Redis vs PostgreSQL, same concurrency.

Redis: the case study's `update_session_activity` pipeline (HSET, HSET, HINCRBY, EXPIRE
in redis-py's default transactional pipeline). PostgreSQL: one UPDATE of the same
seven-field row through asyncpg (autocommit, so one transaction and one WAL flush per
update, like a web app writing the session at the end of each request). N workers each
loop for a fixed duration; both drivers run in this process on the same event loop, so
the client side (Python) limits both rates alike. The server's own CPU per update
(Redis: INFO used_cpu_*; PostgreSQL: /proc of the pool's backend processes) shows the
stores' cost apart from the driver.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from bench import pgdb
from bench.procs import cpu_seconds
from bench.rategen import pct
from bench.sessions import session_fields, session_key

PG_TABLE = """
CREATE TABLE IF NOT EXISTS bench_sessions (
    token text PRIMARY KEY,
    user_id bigint NOT NULL,
    username text NOT NULL,
    email text NOT NULL,
    login_time double precision NOT NULL,
    last_activity double precision NOT NULL,
    current_page text NOT NULL,
    page_views integer NOT NULL
)
"""


async def _drive(
    workers: int, duration: float, op: Callable[[int, int], Awaitable[None]]
) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration

    async def worker(w: int) -> None:
        nonlocal errors
        k = 0
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                await op(w, k)
            except Exception:  # a failed write is counted, not fatal, as in the case study
                errors += 1
            lat.append(time.perf_counter() - t)
            k += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    elapsed = time.perf_counter() - started
    lat.sort()
    return {
        "updates": len(lat),
        "updates_per_s": round(len(lat) / elapsed, 1),
        "errors": errors,
        "mean_ms": round(sum(lat) / max(1, len(lat)) * 1000, 3),
        "p50_ms": round(pct(lat, 50) * 1000, 3),
        "p99_ms": round(pct(lat, 99) * 1000, 3),
    }


async def redis_updates(url: str, workers: int, duration: float, n: int) -> dict[str, Any]:
    r = aioredis.Redis.from_url(url, max_connections=workers + 4)
    keys = [session_key(secrets.token_urlsafe(32)) for _ in range(n)]
    try:
        pipe = r.pipeline(transaction=False)
        for i, k in enumerate(keys):
            pipe.hset(k, mapping=session_fields(i))
        await pipe.execute()

        async def op(w: int, k: int) -> None:
            key = keys[(w * 7919 + k) % n]
            pipe = r.pipeline()
            pipe.hset(key, "last_activity", str(time.time()))
            pipe.hset(key, "current_page", "/products/laptop-123")
            pipe.hincrby(key, "page_views", 1)
            pipe.expire(key, 3600)
            await pipe.execute()

        cpu0 = await _redis_cpu(r)
        out = await _drive(workers, duration, op)
        out["server_cpu_us_per_update"] = round(
            (await _redis_cpu(r) - cpu0) * 1e6 / max(1, out["updates"]), 1
        )
        return out
    finally:
        await r.aclose()


async def _redis_cpu(r: aioredis.Redis) -> float:
    info = await r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def pg_updates(dsn: str, workers: int, duration: float, n: int) -> dict[str, Any]:
    pool = await asyncpg.create_pool(dsn, min_size=workers, max_size=workers)
    tokens = [secrets.token_urlsafe(32) for _ in range(n)]
    try:
        async with pool.acquire() as c:
            await c.execute(PG_TABLE)
            rows = []
            for i, t in enumerate(tokens):
                f = session_fields(i)
                rows.append((t, int(f["user_id"]), f["username"], f["email"],
                             float(f["login_time"]), float(f["last_activity"]),
                             f["current_page"], int(f["page_views"])))  # fmt: skip
            await c.copy_records_to_table("bench_sessions", records=rows)
            await c.execute("ANALYZE bench_sessions")

        async def op(w: int, k: int) -> None:
            await pool.execute(
                "UPDATE bench_sessions SET last_activity = $1, current_page = $2,"
                " page_views = page_views + 1 WHERE token = $3",
                time.time(), "/products/laptop-123", tokens[(w * 7919 + k) % n],
            )  # fmt: skip

        pids = await pgdb.backend_pids(dsn, dsn.rsplit("/", 1)[1])
        cpu0 = cpu_seconds(pids)
        out = await _drive(workers, duration, op)
        out["server_cpu_us_per_update"] = round(
            (cpu_seconds(pids) - cpu0) * 1e6 / max(1, out["updates"]), 1
        )
        return out
    finally:
        await pool.close()
