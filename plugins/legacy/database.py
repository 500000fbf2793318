"""The legacy database, as the plugin needs it: a read-only row or value, and batches of
writes in one transaction. PostgreSQL through asyncpg pools; SQLite through the standard
library on a thread of its own (sqlite3 objects stay on the thread that made them).

Reads run on a connection that cannot write (PostgreSQL: ``default_transaction_read_only``;
SQLite: opened ``mode=ro``), so a configured query cannot change the table whatever it
says. Nothing connects before the first call: a database that is down at start does not
stop the gateway. Callers bound every call with their own timeout.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]

Row = dict[str, Any]
# (sql, rows of arguments): statements of one batch, in order.
Writes = Sequence[tuple[str, Sequence[Sequence[Any]]]]
T = TypeVar("T")

# What a failing database raises, whichever it is: for the callers' except clauses.
DATABASE_FAILURES: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    sqlite3.Error,
)


class LegacyDatabase(ABC):
    @abstractmethod
    async def fetch_row(self, sql: str, args: Sequence[Any]) -> Row | None:
        """The first row of a read-only query, or None."""

    async def fetch_value(self, sql: str, args: Sequence[Any]) -> Any:
        row = await self.fetch_row(sql, args)
        return next(iter(row.values())) if row else None

    @abstractmethod
    async def write(self, writes: Writes) -> None:
        """Every statement of ``writes`` for each of its rows, in one transaction."""

    @abstractmethod
    async def close(self) -> None: ...


def open_legacy_database(dsn: str, pool_size: int, timeout: float) -> LegacyDatabase:
    if dsn.startswith(("postgresql://", "postgres://")):
        return PostgresLegacy(dsn, pool_size, timeout)
    path = dsn.removeprefix("sqlite:")
    if path.startswith("//"):
        path = path[2:]
    return SqliteLegacy(path, pool_size, timeout)


def text_of(value: Any) -> str:
    """A column's value as a session field holds it."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# -- PostgreSQL -------------------------------------------------------------------------

_INTS = frozenset({"int2", "int4", "int8", "oid"})
_FLOATS = frozenset({"float4", "float8"})
_TIMES = frozenset({"timestamp", "timestamptz"})


def _coerce(value: Any, type_name: str) -> Any:
    """A parameter for asyncpg, which takes Python values of the column's type only
    (session fields are strings; ``now`` is a float)."""
    if value is None:
        return None
    if type_name in _INTS:
        return int(float(value)) if isinstance(value, float) else int(value)
    if type_name in _FLOATS:
        return float(value)
    if type_name == "numeric":
        return Decimal(str(value))
    if type_name in _TIMES:
        moment = datetime.fromtimestamp(float(value), UTC)
        return moment if type_name == "timestamptz" else moment.replace(tzinfo=None)
    return value if isinstance(value, str) else str(value)


class PostgresLegacy(LegacyDatabase):
    def __init__(self, dsn: str, pool_size: int, timeout: float) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.timeout = timeout
        self._read: asyncpg.Pool | None = None
        self._write: asyncpg.Pool | None = None
        # Parameter types of each statement, learnt once per process.
        self._types: dict[str, list[str]] = {}

    async def _pool(self, read_only: bool) -> asyncpg.Pool:
        pool = self._read if read_only else self._write
        if pool is None:
            settings = {"application_name": "session-gateway legacy_sessions"}
            if read_only:
                # SECURITY: the configured query runs where it cannot write, whatever it
                # says (a WITH ... DELETE passes for a SELECT).
                settings["default_transaction_read_only"] = "on"
            # min_size=0: no connection until the first call.
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=0,
                max_size=self.pool_size if read_only else 2,
                command_timeout=self.timeout,
                timeout=self.timeout,
                server_settings=settings,
            )
            if read_only:
                self._read = pool
            else:
                self._write = pool
        return pool

    async def _args(self, conn: Any, sql: str, args: Sequence[Any]) -> list[Any]:
        types = self._types.get(sql)
        if types is None:
            stmt = await conn.prepare(sql)
            types = self._types[sql] = [t.name for t in stmt.get_parameters()]
        return [_coerce(v, t) for v, t in zip(args, types, strict=False)]

    async def fetch_row(self, sql: str, args: Sequence[Any]) -> Row | None:
        pool = await self._pool(read_only=True)
        async with pool.acquire() as conn:
            row = await conn.fetchrow(sql, *await self._args(conn, sql, args))
        return dict(row) if row is not None else None

    async def write(self, writes: Writes) -> None:
        pool = await self._pool(read_only=False)
        async with pool.acquire() as conn, conn.transaction():
            for sql, rows in writes:
                typed = [await self._args(conn, sql, r) for r in rows]
                await conn.executemany(sql, typed)

    async def close(self) -> None:
        for pool in (self._read, self._write):
            if pool is not None:
                await pool.close()
        self._read = self._write = None


# -- SQLite -----------------------------------------------------------------------------


def _sqlite_sql(sql: str) -> str:
    return re.sub(r"\$(\d+)", r"?\1", sql)


class SqliteLegacy(LegacyDatabase):
    """One reader thread and one writer thread, each with its own connection; at most
    ``pool_size`` calls queued on them (a slow disk must not pile up work)."""

    def __init__(self, path: str, pool_size: int, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="legacy-read")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="legacy-write")
        self._read_conn: sqlite3.Connection | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._slots = asyncio.Semaphore(pool_size)

    async def _run(self, executor: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        await self._slots.acquire()
        fut = asyncio.get_running_loop().run_in_executor(executor, fn)
        # The slot is free when the thread is done, not when the caller gave up waiting.
        fut.add_done_callback(lambda _: self._slots.release())
        return await asyncio.shield(fut)

    def _reading(self) -> sqlite3.Connection:
        if self._read_conn is None:
            if not Path(self.path).exists():
                raise sqlite3.OperationalError(f"no database at {self.path}")
            # SECURITY: read-only, as the PostgreSQL reader (the query cannot write).
            uri = f"file:{Path(self.path).resolve()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=self.timeout, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            self._read_conn = conn
        return self._read_conn

    def _writing(self) -> sqlite3.Connection:
        if self._write_conn is None:
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            self._write_conn = conn
        return self._write_conn

    async def fetch_row(self, sql: str, args: Sequence[Any]) -> Row | None:
        def run() -> Row | None:
            row = self._reading().execute(_sqlite_sql(sql), tuple(args)).fetchone()
            return dict(row) if row is not None else None

        return await self._run(self._reader, run)

    async def write(self, writes: Writes) -> None:
        def run() -> None:
            conn = self._writing()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in writes:
                    conn.executemany(_sqlite_sql(sql), [tuple(r) for r in rows])
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        await self._run(self._writer, run)

    async def close(self) -> None:
        def shut(conn: sqlite3.Connection | None) -> Callable[[], None]:
            return lambda: conn.close() if conn is not None else None

        await asyncio.get_running_loop().run_in_executor(self._reader, shut(self._read_conn))
        await asyncio.get_running_loop().run_in_executor(self._writer, shut(self._write_conn))
        self._read_conn = self._write_conn = None
        self._reader.shutdown(wait=False)
        self._writer.shutdown(wait=False)
