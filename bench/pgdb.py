"""A throwaway PostgreSQL database per run (never a pre-existing one), and its counters."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator

import asyncpg

from bench.procs import cpu_seconds

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def dsn_for(db: str) -> str:
    return f"postgresql://postgres@127.0.0.1:5432/{db}"


@contextlib.asynccontextmanager
async def throwaway_db(prefix: str = "bench") -> AsyncIterator[str]:
    """Create `<prefix>_<random>`, yield its DSN, drop it (forcibly) afterwards."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_DSN, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield dsn_for(name)
    finally:
        admin = await asyncpg.connect(ADMIN_DSN, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def pg_available() -> str | None:
    try:
        c = await asyncpg.connect(ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as e:
        return f"PostgreSQL at 127.0.0.1:5432 not reachable: {e}"
    await c.close()
    return None


async def write_counters(dsn: str) -> int:
    """n_tup_ins + n_tup_upd + n_tup_del over the database's user tables.

    Backends flush these counters when they go idle (rate-limited) and when they exit,
    so read this after the measured app's connections have closed.
    """
    c = await asyncpg.connect(dsn, timeout=10)
    try:
        await c.execute("SELECT pg_stat_clear_snapshot()")
        v = await c.fetchval(
            "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables"
        )
    finally:
        await c.close()
    return int(v)


async def backend_pids(dsn: str, db: str) -> list[int]:
    """PIDs of the server processes serving connections to `db` (ours excluded)."""
    c = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await c.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", db
        )
    finally:
        await c.close()
    return [int(r["pid"]) for r in rows]


async def db_cpu(dsn: str) -> tuple[list[int], float]:
    db = dsn.rsplit("/", 1)[1]
    pids = await backend_pids(dsn, db)
    return pids, cpu_seconds(pids)


async def durability_settings() -> str:
    """fsync/synchronous_commit decide what an UPDATE costs; the report states them."""
    c = await asyncpg.connect(ADMIN_DSN, timeout=10)
    try:
        names = ("server_version", "fsync", "synchronous_commit", "shared_buffers")
        vals = [f"{n}={await c.fetchval(f'SHOW {n}')}" for n in names]
    finally:
        await c.close()
    return ", ".join(vals)
