"""Real parts for every test: redis-server processes on free loopback ports, real aiohttp
upstream servers that record what they receive, and the gateway app itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app, server_kwargs
from gateway.config import parse_settings
from gateway.testing import GatewayTestServer

from .ops_fixtures import make_admin  # noqa: F401 - fixture (issue 13)

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "security: request-smuggling and spoofing tests")
    config.addinivalue_line("markers", "slow: tests that take several seconds")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server on a free port; can be killed and restarted on that port."""

    def __init__(self, tmp: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.dir = tmp
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.port != 6379, "tests never touch the machine's shared Redis"
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--protected-mode",
                "no",
                "--enable-debug-command",
                "local",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=0.2).ping():
                    return
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on {self.port}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    d = tmp_path / "redis"
    d.mkdir()
    srv = RedisServer(d)
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture
def rdb(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis_server.client()
    yield c
    c.close()


@dataclass
class Recorded:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        vals = self.all(name)
        return vals[0] if vals else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def names(self) -> list[str]:
        return [k for k, _ in self.headers]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Upstream:
    """A real aiohttp server. ``routes`` maps a path to a handler; anything else answers
    200 with a small body. Every request is recorded as received."""

    server: TestServer | None = None
    received: list[Recorded] = field(default_factory=list)
    routes: dict[str, Handler] = field(default_factory=dict)
    response_headers: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    # Added to every answer of the default handler (e.g. an instruction on every page).
    default_headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def last(self) -> Recorded:
        return self.received[-1]

    def reply_headers(self, path: str, *pairs: tuple[str, str]) -> None:
        """Make the default handler answer ``path`` with these extra headers."""
        self.response_headers[path] = list(pairs)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        handler = self.routes.get(request.path)
        if handler is not None and getattr(handler, "streaming", False):
            self.received.append(
                Recorded(request.method, request.raw_path, list(request.headers.items()), b"")
            )
            return await handler(request)
        body = await request.read()
        self.received.append(
            Recorded(request.method, request.raw_path, list(request.headers.items()), body)
        )
        if handler is not None:
            return await handler(request)
        resp = web.Response(text=f"hello {request.path}")
        for k, v in [*self.default_headers, *self.response_headers.get(request.path, [])]:
            resp.headers.add(k, v)
        return resp


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", up._handle)
    # The recording upstream keeps bodies exactly as they arrived on the wire.
    up.server = TestServer(app, host="127.0.0.1")
    await up.server.start_server(auto_decompress=False)
    yield up
    await up.server.close()


BASE_ROUTES: list[dict[str, Any]] = [
    {"path": "/static/", "upstream": "app", "session": "none"},
    {"path": "/account/", "upstream": "app", "session": "required"},
    {"path": "/members/", "upstream": "app", "session": "required", "login_url": "/login"},
    {
        "path": "/closed/",
        "upstream": "app",
        "session": "optional",
        "on_redis_error": "closed",
    },
    {
        "path": "/login",
        "upstream": "app",
        "session": "optional",
        "instructions": ["login", "set"],
    },
    {
        "path": "/",
        "upstream": "app",
        "session": "optional",
        "instructions": ["set", "logout", "cart"],
    },
]


def base_config(redis_url: str, upstream_url: str, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "redis": {"url": redis_url, "timeout": 0.5, "connect_timeout": 0.5},
        "session": {
            "cookie": {"name": "sid", "secure": False},
            "idle_ttl": 600,
            "absolute_ttl": 3600,
        },
        "activity": {"flush_interval": 0.05},
        "upstreams": {"app": {"servers": [upstream_url], "connect_timeout": 2, "read_timeout": 5}},
        "routes": [dict(r) for r in BASE_ROUTES],
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg


GatewayFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def make_gateway(
    redis_server: RedisServer, upstream: Upstream
) -> AsyncIterator[GatewayFactory]:
    """``await make_gateway(**config_overrides)`` → a TestClient on a running gateway."""
    clients: list[TestClient] = []

    async def factory(config: dict[str, Any] | None = None, **over: Any) -> TestClient:
        cfg = config or base_config(redis_server.url, upstream.url, **over)
        settings = parse_settings(cfg)
        server = GatewayTestServer(build_app(settings), settings, host="127.0.0.1")
        # TestServer only applies handler options given to start_server.
        await server.start_server(**server_kwargs(settings))
        client = TestClient(server)
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for c in clients:
        await c.close()


@pytest.fixture
async def gw(make_gateway: GatewayFactory) -> TestClient:
    return await make_gateway()


async def login(client: TestClient, upstream: Upstream, user_id: str = "42", **fields: str) -> str:
    """Log in through the real path (backend answers X-Session-Login); returns the token."""
    params = "; ".join([f"user_id={user_id}"] + [f"{k}={v}" for k, v in fields.items()])
    upstream.reply_headers("/login", ("X-Session-Login", params))
    resp = await client.post("/login")
    assert resp.status == 200, await resp.text()
    token = resp.cookies["sid"].value
    assert token
    return token


async def start_guest(client: TestClient, upstream: Upstream, path: str = "/start") -> str:
    """Become a guest through the real path: guests exist only once the backend stores
    something for the visitor (X-Session-Set here; the route must allow `set`). Returns
    the guest's token; the client's cookie jar holds it."""
    upstream.reply_headers(path, ("X-Session-Set", "guest_started=1"))
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    token = resp.cookies["sid"].value
    assert token
    upstream.reply_headers(path)
    return token


async def wait_for(pred: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def limit_files(n: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], GatewayProcess]]:
    """Start ``python -m gateway`` as a real process (for signals and exit codes);
    ``nofile`` sets its open-file limit (soft and hard)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(cfg: dict[str, Any], nofile: int | None = None) -> GatewayProcess:
        port, admin = free_port(), free_port()
        admin_cfg = {**cfg.get("admin", {}), "listen": f"127.0.0.1:{admin}"}
        cfg = {**cfg, "listen": f"127.0.0.1:{port}", "admin": admin_cfg}
        path = Path(tempfile.mkstemp(suffix=".yaml", dir=tmp_path)[1])
        path.write_text(yaml.safe_dump(cfg))
        log_path = path.with_suffix(".log")
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(path)],
            cwd=ROOT,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=None if nofile is None else lambda: limit_files(nofile),
            # Its own process group: the teardown ends the workers of a supervisor too
            # (killing the supervisor alone left them running, holding ports and CPU).
            start_new_session=True,
        )
        procs.append(proc)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited {proc.returncode}: {log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("gateway did not start listening")
        return GatewayProcess(proc, port, admin, log_path)

    yield start
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


async def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes exactly as given and return everything the server answers until it
    closes the connection (requests should carry ``Connection: close``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


async def start_backend(handler: Handler) -> tuple[web.AppRunner, str]:
    """A plain aiohttp backend on a free port answering every path with ``handler``
    (for tests that run the gateway as a separate process)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


# A private PostgreSQL (initdb/pg_ctl on a free port) for the legacy session tests.
from .postgres import pg_dsn, postgres_server  # noqa: E402, F401

# Real Sentinel and Cluster topologies (tests/topologies.py).
pytest_plugins = ["tests.topologies"]
