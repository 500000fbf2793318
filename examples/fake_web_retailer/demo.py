"""``make demo``: the Fake Web Retailer behind the Session Gateway, end to end.

Starts a private Redis (gateway.embedded), the shop in gateway mode (SQLite in a
temporary directory) and ``python -m gateway`` with a generated config, runs the scripted
walk (walk.py: two browsers, a guest cart, a login that merges it into the user's cart,
one cart on two devices, the inspector, logout everywhere, a page served from the page
cache; then it removes what it created), and serves until Ctrl-C.

    python -m examples.fake_web_retailer.demo          # walk, then serve until Ctrl-C
    python -m examples.fake_web_retailer.demo --once   # walk, exit 0 only if all passed
    python -m examples.fake_web_retailer.demo --host 0.0.0.0 --port 8080
"""

# ruff: noqa: E402 - the imports after the first few come after the Ctrl-C handler that
# covers their loading (a second or more on a cold start).
from __future__ import annotations

import os
import signal
from types import FrameType

STOPPED = "stopped: gateway, shop and redis are down."


def _interrupted_early(signum: int, frame: FrameType | None) -> None:
    # Ctrl-C while the modules below load: nothing is started yet.
    print(STOPPED, flush=True)
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _interrupted_early)

import argparse
import asyncio
import contextlib
import io
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import aiohttp
import redis.asyncio as aioredis
import yaml
from aiohttp import web

from gateway.redis.embedded import EmbeddedRedis, EmbeddedRedisError

from .app import make_app
from .views import STATE
from .walk import COOKIE, TOP_REFRESH, StepFailed, Visit, walk

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PORT = 8000
_said: list[str] = []


def say_stopped() -> None:
    if not _said:
        _said.append(STOPPED)
        print(STOPPED, flush=True)


def gateway_config(listen: str, redis_url: str, shop_url: str) -> dict[str, Any]:
    """The config.yaml the demo gives the gateway (format: DESIGN.md)."""
    return {
        "listen": listen,
        "redis": {"url": redis_url},
        "session": {
            # Plain http on localhost: a Secure cookie would not come back.
            "cookie": {"name": COOKIE, "secure": False, "http_only": True, "same_site": "Lax"},
            "idle_ttl": 3600,
            "absolute_ttl": 28800,
        },
        "upstreams": {"shop": {"servers": [shop_url]}},
        "routes": [
            # Probes must not mint guest sessions.
            {"path": "/healthz", "upstream": "shop", "session": "none"},
            {"path": "/login", "upstream": "shop", "session": "optional",
             "instructions": ["login", "set"]},
            {"path": "/", "upstream": "shop", "session": "optional",
             "instructions": ["set", "logout", "cart"], "guest": True},
        ],
        # Order as in docs/plugins.md: page_cache before viewed_items and cart. A hit
        # answers in page_cache's request hook and skips the later request hooks (the
        # cart's HGETALL), which a cached page does not need; response hooks always run,
        # so viewed_items still counts every hit as a view, and the ranking that only_top
        # reads stays right. A rate_limit would go first, so that hits are limited too.
        "plugins": [
            # The shop sends "public, max-age=0, s-maxage=30" on product pages for guests
            # (browsers revalidate, the gateway keeps them 30 s) and "private, no-store"
            # on every page with session data, which the cache refuses. only_top: just the
            # 10 most viewed products (of 20) are cached: the popular pages are where a
            # cache saves the shop work. top_refresh is short so that the walk sees the
            # ranking take effect (default 5 s). report: the shop's inspector hears
            # whether the last product page came from the cache.
            {"page_cache": {"paths": ["/products/"], "ttl": 30, "only_top": 10,
                            "top_refresh": TOP_REFRESH, "report": True}},
            {"viewed_items": {"pattern": "/products/{item}", "flush_interval": 0.1}},
            # The contents header lets the cart page list the items, not just the totals.
            {"cart": {"contents_header": True}},
        ],
    }


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def visit_url(host: str, port: int) -> str:
    """The address a browser on this machine opens."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"


async def wait_for_gateway(url: str, proc: asyncio.subprocess.Process, log: Path,
                           limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    async with aiohttp.ClientSession() as http:
        while True:
            if proc.returncode is not None:
                raise StepFailed(f"the gateway exited with status {proc.returncode}; "
                                 f"last lines of {log}:\n{tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=1)):
                    return  # any answer: the listener is up
            if time.monotonic() > deadline:
                raise StepFailed(f"the gateway did not answer {url} within {limit:g}s; "
                                 f"last lines of {log}:\n{tail(log)}")
            await asyncio.sleep(0.1)


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), timeout=10)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def ready(url: str, host: str) -> None:
    """The last thing printed: where to go, whoever scrolled past the walk."""
    line = "-" * 72
    print(f"\n{line}\nThe demo is ready: open {url} in a browser.")
    if host in ("0.0.0.0", "::"):
        print("  It listens on every interface: from another machine use this one's address.")
    print("  Log in as alice / alice-password or bob / bob-password (more on the login page).")
    print("  Every page links the Inspector: what the gateway added to the request, what it")
    print("  keeps in Redis, and the shop's session writes (none).")
    print(f"  Ctrl-C stops everything.\n{line}")


async def run(args: argparse.Namespace, workdir: Path) -> int:
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(say_stopped)
        redis = EmbeddedRedis(workdir / "redis")
        try:
            redis_url = await redis.start()
        except EmbeddedRedisError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            stack.push_async_callback(redis.stop)
        print(f"redis:   {redis_url} (pid {redis.pid}, data in {redis.data_dir})")

        shop_db = workdir / "shop.sqlite3"
        shop_app = make_app("gateway", f"sqlite:{shop_db}", inspect_redis=redis_url)
        runner = web.AppRunner(shop_app, access_log=None)
        stack.push_async_callback(runner.cleanup)
        await runner.setup()
        # The shop trusts X-Session-* headers: only the gateway may reach it (loopback).
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        shop_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        print(f"shop:    {shop_url} (gateway mode, database {shop_db})")

        config = workdir / "gateway.yaml"
        listen = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
        # The operations walk (issue 13): two workers, the admin listener and its API.
        from .ops_walk import Ops, ops_config, ops_walk

        admin_port = free_port()
        cfg = {**gateway_config(listen, redis_url, shop_url), **ops_config(admin_port)}
        config.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        log_path = workdir / "gateway.log"
        command = [*shlex.split(args.gateway_cmd), "--config", str(config)]
        log: IO[bytes] = open(log_path, "wb")  # noqa: ASYNC230 - once, at start
        stack.callback(log.close)
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT,
            # Its own process group: Ctrl-C reaches the demo, which then stops it in order.
            start_new_session=True,
        )
        stack.push_async_callback(stop_process, proc)
        base = f"http://127.0.0.1:{args.port}" if args.host in ("0.0.0.0", "::") else (
            visit_url(args.host, args.port).rstrip("/"))
        print(f"gateway: {listen} (pid {proc.pid}, config {config}, log {log_path})")
        try:
            await wait_for_gateway(base + "/healthz", proc, log_path)
        except StepFailed as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1

        client = aioredis.from_url(redis_url, decode_responses=True)
        stack.push_async_callback(client.aclose)
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1 too
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            results = await walk(Visit(base, http, client))
            if not any(err for _, err in results):
                admin = f"http://127.0.0.1:{admin_port}"
                ops = Ops(Visit(base, http, client), admin, cfg["admin"]["token"], config,
                          proc, redis)
                results += await ops_walk(ops)
        db = shop_app[STATE].db
        rows, writes = await db.count_sessions(), db.session_writes
        print(f"\nshop database: {rows} session rows, {writes} session writes")
        failed = [(name, err) for name, err in results if err]
        if rows or writes:
            failed.append(("the shop database saw no session writes", f"{writes} writes"))
        status = 0
        if failed:
            name, err = failed[0]
            print(f"\nDEMO FAILED at step: {name}: {err}")
            print(f"(gateway log: {log_path})\n{tail(log_path, 10)}")
            status = 1
        else:
            print("\nAll steps passed.")
        if args.once:
            return status
        ready(visit_url(args.host, args.port), args.host)
        print(f"  Admin listener: http://127.0.0.1:{admin_port}/metrics, /readyz, /admin/ "
              f"(Authorization: Bearer {cfg['admin']['token']})")
        await proc.wait()
        print(f"the gateway exited with status {proc.returncode}; log:\n{tail(log_path)}")
        return 1
    return 1  # not reached: the stack's body returns


async def run_until_stopped(args: argparse.Namespace, workdir: Path) -> int:
    """``run``, which Ctrl-C (or SIGTERM) stops at any moment: everything started so far
    is stopped in reverse order, and one line says so."""
    main = asyncio.current_task()
    assert main is not None
    stopping = False

    def stop() -> None:
        nonlocal stopping
        if not stopping:  # a second Ctrl-C does not interrupt the clean-up
            stopping = True
            main.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        return await run(args, workdir)
    except asyncio.CancelledError:
        if not stopping:
            raise
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.fake_web_retailer.demo",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--once", action="store_true",
                        help="walk once and exit: 0 if every step passed")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the gateway listens on (default: %(default)s; "
                             "0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="gateway port (default: %(default)s; 0: a free one)")
    parser.add_argument("--data-dir", type=Path,
                        help="keep Redis, the shop DB, config and logs here (default: a "
                             "temporary directory, removed at exit)")
    parser.add_argument("--gateway-cmd", default=f"{shlex.quote(sys.executable)} -m gateway",
                        help="command that runs the gateway; '--config FILE' is appended "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    # From here Ctrl-C raises KeyboardInterrupt (asyncio.run turns it into cancelling
    # run_until_stopped, which then handles it itself).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.port == 0:
        args.port = free_port()
    elif not port_free(args.host, args.port):
        print(f"error: port {args.port} on {args.host} is in use; pick another, e.g. "
              f"make demo ARGS='--port {args.port + 1}'", file=sys.stderr)
        return 2
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # progress shows up as it happens
    try:
        if args.data_dir:
            args.data_dir.mkdir(parents=True, exist_ok=True)
            return asyncio.run(run_until_stopped(args, args.data_dir.resolve()))
        with tempfile.TemporaryDirectory(prefix="fwr-demo-") as tmp:
            return asyncio.run(run_until_stopped(args, Path(tmp)))
    except KeyboardInterrupt:
        # Ctrl-C before the event loop took over the signal.
        say_stopped()
        return 130


if __name__ == "__main__":
    sys.exit(main())
