"""The shop's own database: users, products and (legacy mode only) sessions.

SQLite through the stdlib ``sqlite3`` module (on one dedicated thread, so the event loop
never blocks on disk) or PostgreSQL through an ``asyncpg`` pool. Both run the same SQL:
it is written with ``$1``-style placeholders, which SQLite reads as ``?1``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from .catalog import PRODUCTS, USERS, Product
from .passwords import hash_password

Row = dict[str, Any]

SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS users (
        user_id       BIGINT PRIMARY KEY,
        username      TEXT NOT NULL UNIQUE,
        email         TEXT NOT NULL,
        full_name     TEXT NOT NULL,
        password_hash TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS products (
        sku         TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        category    TEXT NOT NULL,
        price       TEXT NOT NULL,
        description TEXT NOT NULL,
        position    INTEGER NOT NULL
    )""",
    # The legacy world's session table, as in the case study's "before" picture: every
    # page view reads one row and writes it back.
    """CREATE TABLE IF NOT EXISTS sessions (
        token         TEXT PRIMARY KEY,
        user_id       BIGINT,
        username      TEXT,
        email         TEXT,
        login_time    DOUBLE PRECISION,
        created_at    DOUBLE PRECISION NOT NULL,
        last_activity DOUBLE PRECISION NOT NULL,
        current_page  TEXT NOT NULL DEFAULT '',
        page_views    INTEGER NOT NULL DEFAULT 0,
        cart          TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX IF NOT EXISTS sessions_user_id ON sessions (user_id)",
)

SESSION_COLUMNS = (
    "token, user_id, username, email, login_time, created_at, last_activity, "
    "current_page, page_views, cart"
)


@dataclass(frozen=True, slots=True)
class UserRecord:
    user_id: int
    username: str
    email: str
    full_name: str
    password_hash: str


class Database(ABC):
    """Shop queries on top of four primitives that each backend implements."""

    def __init__(self) -> None:
        # Counts every statement that writes the sessions table: gateway mode must keep
        # it at zero, and tests check that it does.
        self.session_writes = 0

    # ------------------------------------------------------------- primitives
    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; return the number of rows it changed."""

    @abstractmethod
    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    @abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    # ------------------------------------------------------------ setup, seed
    async def init(self) -> None:
        for statement in SCHEMA:
            await self.execute(statement)
        await self.executemany(
            "INSERT INTO products (sku, name, category, price, description, position) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (sku) DO NOTHING",
            [
                (p.sku, p.name, p.category, str(p.price), p.description, i)
                for i, p in enumerate(PRODUCTS)
            ],
        )
        existing = {row["username"] for row in await self.fetch("SELECT username FROM users")}
        missing = [u for u in USERS if u.username not in existing]
        # scrypt is deliberately slow: hash off the event loop.
        hashes = await asyncio.gather(
            *(asyncio.to_thread(hash_password, u.password) for u in missing)
        )
        await self.executemany(
            "INSERT INTO users (user_id, username, email, full_name, password_hash) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            [
                (u.user_id, u.username, u.email, u.full_name, h)
                for u, h in zip(missing, hashes, strict=True)
            ],
        )

    # ---------------------------------------------------------- shop queries
    async def load_products(self) -> tuple[Product, ...]:
        rows = await self.fetch(
            "SELECT sku, name, category, price, description FROM products ORDER BY position"
        )
        return tuple(
            Product(r["sku"], r["name"], r["category"], Decimal(r["price"]), r["description"])
            for r in rows
        )

    async def get_user(self, username: str) -> UserRecord | None:
        row = await self.fetchrow(
            "SELECT user_id, username, email, full_name, password_hash "
            "FROM users WHERE username = $1",
            username,
        )
        return UserRecord(**row) if row else None

    # ------------------------------------------------- legacy-mode sessions
    async def session_get(self, token: str) -> Row | None:
        return await self.fetchrow(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE token = $1", token
        )

    async def session_create(self, token: str, now: float, page: str) -> None:
        self.session_writes += 1
        await self.execute(
            "INSERT INTO sessions (token, created_at, last_activity, current_page, page_views) "
            "VALUES ($1, $2, $2, $3, 1)",
            token,
            now,
            page,
        )

    async def session_touch(self, token: str, now: float, page: str) -> None:
        self.session_writes += 1
        await self.execute(
            "UPDATE sessions SET last_activity = $2, current_page = $3, "
            "page_views = page_views + 1 WHERE token = $1",
            token,
            now,
            page,
        )

    async def session_login(
        self, old_token: str, new_token: str, user: UserRecord, now: float
    ) -> None:
        """Attach the user and rotate the token in one statement; the cart stays."""
        self.session_writes += 1
        changed = await self.execute(
            "UPDATE sessions SET token = $2, user_id = $3, username = $4, email = $5, "
            "login_time = $6, last_activity = $6 WHERE token = $1",
            old_token,
            new_token,
            user.user_id,
            user.username,
            user.email,
            now,
        )
        if changed == 0:  # the old row expired or vanished meanwhile
            await self.execute(
                "INSERT INTO sessions (token, user_id, username, email, login_time, "
                "created_at, last_activity, page_views) VALUES ($1, $2, $3, $4, $5, $5, $5, 1)",
                new_token,
                user.user_id,
                user.username,
                user.email,
                now,
            )

    async def session_set_cart(self, token: str, cart_json: str) -> None:
        self.session_writes += 1
        await self.execute("UPDATE sessions SET cart = $2 WHERE token = $1", token, cart_json)

    async def session_delete(self, token: str) -> None:
        self.session_writes += 1
        await self.execute("DELETE FROM sessions WHERE token = $1", token)

    async def session_delete_user(self, user_id: int) -> None:
        self.session_writes += 1
        await self.execute("DELETE FROM sessions WHERE user_id = $1", user_id)

    async def count_sessions(self) -> int:
        row = await self.fetchrow("SELECT COUNT(*) AS n FROM sessions")
        return int(row["n"]) if row else 0


class SqliteDatabase(Database):
    """SQLite on one worker thread (sqlite3 objects stay on the thread that made them)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _connect(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 5000")
        if self.path != ":memory:":
            # What a tuned production SQLite uses: the baseline is not sandbagged.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        self._conn = conn

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("database is not open")
        return self._conn

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("$", "?")

    async def open(self) -> None:
        await self._run(self._connect)

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)

    async def execute(self, sql: str, *args: Any) -> int:
        def run() -> int:
            return self.conn.execute(self._sql(sql), args).rowcount

        return int(await self._run(run))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        def run() -> None:
            self.conn.execute("BEGIN")
            try:
                self.conn.executemany(self._sql(sql), rows)
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

        if rows:
            await self._run(run)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        def run() -> list[Row]:
            return [dict(r) for r in self.conn.execute(self._sql(sql), args).fetchall()]

        result: list[Row] = await self._run(run)
        return result


class PostgresDatabase(Database):
    """PostgreSQL through an asyncpg connection pool."""

    def __init__(self, dsn: str, min_size: int = 2, max_size: int = 10) -> None:
        super().__init__()
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("database is not open")
        return self._pool

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=self.min_size, max_size=self.max_size
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def execute(self, sql: str, *args: Any) -> int:
        status: str = await self.pool.execute(sql, *args)
        # "UPDATE 3", "INSERT 0 1", "CREATE TABLE": the count is the last word, if any.
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            await self.pool.executemany(sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return [dict(r) for r in await self.pool.fetch(sql, *args)]


def open_database(db_url: str) -> Database:
    """``sqlite:PATH`` (``sqlite::memory:`` too) or ``postgresql://…`` (``postgres://…``)."""
    if db_url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(db_url)
    if db_url.startswith("sqlite:"):
        path = db_url.removeprefix("sqlite:")
        if path.startswith("//"):  # tolerate sqlite:///abs/path
            path = path[2:]
        if not path:
            raise ValueError("sqlite URL needs a path: sqlite:PATH or sqlite::memory:")
        return SqliteDatabase(path)
    raise ValueError(f"unsupported database URL {db_url!r}: use sqlite:PATH or postgresql://…")
