"""A private PostgreSQL server for the tests: ``initdb`` and ``pg_ctl`` in a temporary
directory, listening on a free loopback port. The machine's own server (5432) is never
touched. Pulled into every test module by conftest.py.

``postgres_server`` is one server for the whole session (initdb costs seconds);
``pg_dsn`` is a fresh database on it per test, dropped afterwards. A test that stops the
server starts a ``PostgresServer`` of its own.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest


def pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl (``PG_BIN`` overrides)."""
    candidates = [os.environ.get("PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).resolve().parent))
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


class PostgresServer:
    """initdb + pg_ctl on a free port. As root (initdb refuses root) the server runs as
    the ``postgres`` system user; its directory is made theirs."""

    def __init__(self, bin_dir: Path) -> None:
        from .conftest import free_port

        self.bin = bin_dir
        self.port = free_port()
        assert self.port != 5432, "tests never touch the machine's own PostgreSQL"
        self.dir = Path(tempfile.mkdtemp(prefix="gw-test-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres"
            pw = pwd.getpwnam(self._user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.initialised = False
        # Counts of each statement as the server ran it (statement_calls), when the
        # extension is installed (Debian's postgresql package has it).
        self.statement_stats = (bin_dir.parent / "lib" / "pg_stat_statements.so").exists()

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            args,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            user=self._user,
            cwd=self.dir,
        )

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        if not self.initialised:
            self._run(
                str(self.bin / "initdb"),
                "-D", str(self.data),
                "-U", "postgres",
                "--auth=trust",
                "-E", "UTF8",
                "--no-sync",
            )  # fmt: skip
            self.initialised = True
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.dir} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=60"
        )
        if self.statement_stats:
            opts += " -c shared_preload_libraries=pg_stat_statements"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
            "-o", opts, "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self) -> None:
        if self.initialised and (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def create_database(self) -> str:
        name = f"t_{secrets.token_hex(4)}"
        admin = await asyncpg.connect(self.dsn(), timeout=10)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        if self.statement_stats:
            conn = await asyncpg.connect(self.dsn(name), timeout=10)
            try:
                await conn.execute("CREATE EXTENSION pg_stat_statements")
            finally:
                await conn.close()
        return name

    async def drop_database(self, name: str) -> None:
        admin = await asyncpg.connect(self.dsn(), timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def statement_calls(dsn: str, fragment: str) -> int:
    """How many times the server ran statements containing ``fragment`` on this
    database (pg_stat_statements: counted by the server as each one finishes)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        n = await conn.fetchval(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid "
            "WHERE d.datname = current_database() AND s.query LIKE $1",
            f"%{fragment}%",
        )
    finally:
        await conn.close()
    return int(n)


def new_postgres() -> PostgresServer:
    bin_dir = pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: `make system-deps`")
    srv = PostgresServer(bin_dir)
    try:
        srv.start()
    except subprocess.CalledProcessError as e:
        log = srv.log.read_text(errors="replace") if srv.log.exists() else ""
        srv.remove()
        raise RuntimeError(f"private PostgreSQL did not start: {e.stderr!r} {log}") from e
    return srv


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    srv = new_postgres()
    yield srv
    srv.remove()


@pytest.fixture
async def pg_dsn(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A fresh, empty database on the private server."""
    name = await postgres_server.create_database()
    yield postgres_server.dsn(name)
    await postgres_server.drop_database(name)
