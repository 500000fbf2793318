"""A private ``redis-server`` child for ``redis.url: embedded``.

The gateway (or the demo) starts one Redis of its own, with its own data directory and
AOF persistence, reachable only through a unix socket inside that directory (mode 0700,
so only this user can connect). When the socket path would be too long for the kernel
(``sun_path`` is 108 bytes on Linux), it falls back to a free loopback port protected by
a random password.

The child is started in its own session so a Ctrl-C in the terminal reaches only the
gateway, which then stops Redis with ``SHUTDOWN`` (flushing the AOF) instead of racing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import IO
from urllib.parse import quote

__all__ = ["EmbeddedRedis", "EmbeddedRedisError"]

# Linux sun_path is 108 bytes including the terminating NUL; stay clear of it.
_MAX_UNIX_PATH = 100
_LOG_TAIL_LINES = 20


def socket_path(data_dir: Path) -> Path | None:
    """Where the embedded server listens in ``data_dir``; None when that path is too long
    for a Unix socket (the server then listens on a loopback port with a password)."""
    sock = data_dir.resolve() / "redis.sock"
    return sock if len(os.fsencode(sock)) <= _MAX_UNIX_PATH else None


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be started (or is in a state we refuse to use)."""


class EmbeddedRedis:
    """Start, probe and stop a private ``redis-server`` process."""

    def __init__(self, data_dir: Path, redis_server: str = "redis-server") -> None:
        self.data_dir = Path(data_dir)
        self.redis_server = redis_server
        self._process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self._url: str | None = None
        self._socket: Path | None = None
        self._port: int | None = None
        self._password: str | None = None

    # ------------------------------------------------------------------ paths
    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "redis.conf"

    @property
    def url(self) -> str:
        """The URL of the running server; only valid after :meth:`start`."""
        if self._url is None:
            raise EmbeddedRedisError("embedded Redis is not running")
        return self._url

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -------------------------------------------------------------- lifecycle
    async def start(self, timeout: float = 10.0) -> str:  # noqa: ASYNC109 - public API
        """Start ``redis-server`` and wait until it answers PING; return its URL."""
        if self._process is not None and self._process.returncode is None:
            return self.url
        binary = shutil.which(self.redis_server)
        if binary is None:
            raise EmbeddedRedisError(
                f"redis-server not found on PATH (looked for {self.redis_server!r}): "
                "install it with `apt-get install redis-server` (Debian/Ubuntu) or "
                "`brew install redis`, or set redis.url to your Redis server"
            )
        self.data_dir = self.data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

        sock = socket_path(self.data_dir)
        if sock is not None:
            self._socket, self._port, self._password = sock, None, None
            if await self._ping(1.0):
                # Two servers appending to one AOF would corrupt it: refuse, loudly.
                raise EmbeddedRedisError(
                    f"a Redis server is already answering on {sock}; "
                    "stop it or choose another data directory"
                )
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        else:
            self._socket = None
            self._port = _free_loopback_port()
            self._password = secrets.token_urlsafe(24)

        self._write_config()
        self._log = self._open_log()
        self._process = await asyncio.create_subprocess_exec(
            binary,
            str(self.config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            cwd=self.data_dir,
            start_new_session=True,
        )

        deadline = time.monotonic() + timeout
        while True:
            if self._process.returncode is not None:
                status = self._process.returncode
                self._cleanup()
                raise EmbeddedRedisError(
                    f"redis-server exited with status {status} during start; "
                    f"last lines of {self.log_path}:\n{self._log_tail()}"
                )
            if await self._ping(0.5):
                break
            if time.monotonic() >= deadline:
                await self._terminate()
                raise EmbeddedRedisError(
                    f"redis-server did not answer PING within {timeout:g}s; "
                    f"last lines of {self.log_path}:\n{self._log_tail()}"
                )
            await asyncio.sleep(0.05)

        if self._socket is not None:
            self._url = "unix://" + quote(str(self._socket))
        else:
            assert self._password is not None
            self._url = f"redis://:{quote(self._password, safe='')}@127.0.0.1:{self._port}/0"
        return self._url

    async def stop(self) -> None:
        """``SHUTDOWN`` the server (the AOF is flushed), then terminate or kill if needed."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(OSError, TimeoutError, EmbeddedRedisError):
                async with asyncio.timeout(5.0):
                    await self._command(b"SHUTDOWN")
            try:
                await asyncio.wait_for(process.wait(), timeout=10.0)
            except TimeoutError:
                await self._terminate()
        self._cleanup()

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ---------------------------------------------------------------- helpers
    def _write_config(self) -> None:
        lines = [
            "daemonize no",
            f'dir "{_conf_escape(str(self.data_dir))}"',
            "appendonly yes",
            "appendfsync everysec",
            'logfile ""',  # stdout, which goes to redis.log: start errors land there too
        ]
        if self._socket is not None:
            lines += [
                "port 0",
                f'unixsocket "{_conf_escape(str(self._socket))}"',
                "unixsocketperm 700",
            ]
        else:
            assert self._password is not None
            lines += [
                "bind 127.0.0.1",
                f"port {self._port}",
                f'requirepass "{self._password}"',
            ]
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("# written by gateway.embedded on every start; edits are lost\n")
            fh.write("\n".join(lines) + "\n")

    async def _command(self, command: bytes) -> bytes:
        """Send one command (after AUTH if needed); return the first reply line.

        Callers bound it with ``asyncio.timeout``.
        """
        if self._socket is not None:
            reader, writer = await asyncio.open_unix_connection(str(self._socket))
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self._port)
        try:
            if self._password is not None:
                writer.write(_resp(b"AUTH", self._password.encode()))
            writer.write(_resp(command))
            await writer.drain()
            if self._password is not None:
                auth = await reader.readline()
                if not auth.startswith(b"+OK"):
                    raise EmbeddedRedisError(f"AUTH refused: {auth!r}")
            return await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _ping(self, limit: float) -> bool:
        # While Redis replays the AOF it answers -LOADING: not ready yet.
        try:
            async with asyncio.timeout(limit):
                return await self._command(b"PING") == b"+PONG\r\n"
        except (OSError, TimeoutError, EmbeddedRedisError):
            return False

    def _open_log(self) -> IO[bytes]:
        # Kept open for the child's lifetime; closed in _cleanup().
        return open(self.log_path, "ab")

    async def _terminate(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=5.0)
        except TimeoutError:
            process.kill()
            await process.wait()

    def _cleanup(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self._process = None
        self._url = None

    def _log_tail(self) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        lines = text.splitlines()[-_LOG_TAIL_LINES:]
        return "\n".join(lines) if lines else "(log is empty)"


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def _conf_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
