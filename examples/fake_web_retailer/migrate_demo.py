"""``make migrate-demo``: the case study's migration roadmap, on this machine.

The Fake Web Retailer starts in legacy mode (its own ``sessions`` table, one write per
page view) with browsers logged in and browsing. Then the Session Gateway is put in
front of it and its sessions are rolled out the way the case study plans it:

    0  before       the shop alone: every page view writes the sessions table
    1  10 %         read-through (legacy_sessions) for a tenth of the visitors; the rest
                    pass through; logins and logouts through the gateway written back
    2  100 %        every visitor on the gateway's sessions; writes to both (rollback
                    window: only logins and logouts reach the table)
    3  Redis only   rollback window closed: the table is kept as a backup, read for the
                    last legacy sessions, never written
    4  cut over     legacy_sessions removed, the shop in gateway mode: no database
                    session work at all

Each phase runs the same load (logged-in browsers, guests, and a few browsers that log
out and in again) for ``--phase-seconds`` and prints the database's session writes per
minute. Every logged-in browser is checked at the start and end of every phase: no one
may be logged out. The gateway is restarted with each phase's config (with SIGHUP reload
it would be a reload); sessions live in Redis, so a restart logs no one out either.

    python -m examples.fake_web_retailer.migrate_demo [--phase-seconds 15]

Exit status 0 only if no one was logged out and the last phases wrote nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import redis.asyncio as aioredis
import yaml
from aiohttp import web

from gateway.redis.embedded import EmbeddedRedis, EmbeddedRedisError

from .app import make_app
from .catalog import PRODUCTS, USERS
from .demo import free_port, stop_process, tail, wait_for_gateway
from .migrating import legacy_sessions_options
from .views import STATE

ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {u.username: u.password for u in USERS}
PAGES = ("/", "/products", "/cart", *(f"/products/{p.sku}" for p in PRODUCTS[:6]))


@dataclass
class Phase:
    number: int
    title: str
    shop_mode: str  # legacy, migrating, gateway
    # None: no gateway in front; {}: a gateway without legacy_sessions.
    legacy: dict[str, Any] | None
    # Phases whose session writes must be zero.
    zero_writes: bool = False


@dataclass
class Result:
    phase: Phase
    seconds: float
    requests: int = 0
    shop_writes: int = 0
    gateway_writes: int = 0
    reads: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    logged_in: tuple[int, int] = (0, 0)
    errors: int = 0
    # The rollback drill after this phase: (still logged in, checked).
    drill: tuple[int, int] | None = None

    @property
    def writes(self) -> int:
        return self.shop_writes + self.gateway_writes

    @property
    def per_minute(self) -> float:
        return self.writes * 60 / self.seconds


class Browser:
    """A cookie jar and what it is: logged in as ``user`` (checked), a guest, or a
    browser that logs out and in again (``churn``)."""

    def __init__(self, user: str | None, churn: bool = False) -> None:
        self.user = user
        self.churn = churn
        self.http = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            timeout=aiohttp.ClientTimeout(total=10),
        )

    async def login(self, base: str) -> None:
        assert self.user is not None
        data = {"username": self.user, "password": PASSWORDS[self.user], "next": "/"}
        async with self.http.post(base + "/login", data=data) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"login as {self.user} answered {resp.status}")

    async def logout(self, base: str) -> None:
        async with self.http.post(base + "/logout") as resp:
            await resp.read()

    async def who(self, base: str) -> str | None:
        """The user the shop sees on this browser's requests (None: a guest)."""
        async with self.http.get(base + "/debug/headers") as resp:
            seen = await resp.json()
        return str(seen["fields"].get("username")) if seen["authenticated"] else None

    async def get(self, base: str, path: str) -> int:
        async with self.http.get(base + path) as resp:
            await resp.read()
            return resp.status


class Demo:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.db_url = f"sqlite:{workdir / 'shop.sqlite3'}"
        self.shop_port = free_port()
        self.gateway_port = free_port()
        self.shop: web.AppRunner | None = None
        self.shop_app: web.Application | None = None
        self.gateway: asyncio.subprocess.Process | None = None
        self.gateway_log: IO[bytes] | None = None
        users = [u.username for u in USERS]
        self.regulars = [Browser(users[i % len(users)]) for i in range(args.browsers)]
        self.guests = [Browser(None) for _ in range(args.browsers // 2)]
        self.churners = [Browser(users[i % len(users)], churn=True) for i in range(3)]

    @property
    def browsers(self) -> list[Browser]:
        return [*self.regulars, *self.guests, *self.churners]

    # -- the shop and the gateway -------------------------------------------------------

    async def start_shop(self, mode: str) -> None:
        await self.stop_shop()
        self.shop_app = make_app(mode, self.db_url)
        self.shop = web.AppRunner(self.shop_app, access_log=None)
        await self.shop.setup()
        await web.TCPSite(self.shop, "127.0.0.1", self.shop_port).start()

    async def stop_shop(self) -> None:
        if self.shop is not None:
            await self.shop.cleanup()
            self.shop = self.shop_app = None

    def shop_writes(self) -> int:
        assert self.shop_app is not None
        return int(self.shop_app[STATE].db.session_writes)

    def config(self, phase: Phase, redis_url: str) -> dict[str, Any]:
        plugins = []
        if phase.legacy:
            plugins.append({"legacy_sessions": phase.legacy})
        return {
            "listen": f"127.0.0.1:{self.gateway_port}",
            "redis": {"url": redis_url},
            "session": {"cookie": {"name": "sid", "secure": False}},
            "upstreams": {"shop": {"servers": [f"http://127.0.0.1:{self.shop_port}"]}},
            # Every browser here is one loopback address.
            "limits": {"upstream_per_address": 256},
            "routes": [
                {"path": "/healthz", "upstream": "shop", "session": "none"},
                {"path": "/login", "upstream": "shop", "instructions": ["login", "set"]},
                {"path": "/", "upstream": "shop", "instructions": ["set", "logout"]},
            ],
            "plugins": plugins,
        }

    async def start_gateway(self, phase: Phase, redis_url: str) -> Path:
        await self.stop_gateway()
        path = self.workdir / f"gateway-phase{phase.number}.yaml"
        path.write_text(yaml.safe_dump(self.config(phase, redis_url), sort_keys=False))
        log_path = self.workdir / "gateway.log"
        self.gateway_log = open(log_path, "ab")  # noqa: ASYNC230 - once per phase
        command = [*shlex.split(self.args.gateway_cmd), "--config", str(path)]
        self.gateway = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self.gateway_log,
            stderr=self.gateway_log,
            cwd=ROOT,
            start_new_session=True,
        )
        await wait_for_gateway(self.base(phase) + "/healthz", self.gateway, log_path)
        return path

    async def stop_gateway(self) -> None:
        if self.gateway is not None:
            await stop_process(self.gateway)
            self.gateway = None
        if self.gateway_log is not None:
            self.gateway_log.close()
            self.gateway_log = None

    def base(self, phase: Phase) -> str:
        port = self.shop_port if phase.legacy is None else self.gateway_port
        return f"http://127.0.0.1:{port}"

    # -- the load -----------------------------------------------------------------------

    async def check_logged_in(self, base: str, churners: bool = False) -> tuple[int, int]:
        """(still logged in as themselves, logged-in browsers checked)."""
        checked = [*self.regulars, *(self.churners if churners else ())]
        seen = await asyncio.gather(*(b.who(base) for b in checked))
        for b, user in zip(checked, seen, strict=True):
            if user != b.user:
                print(f"    LOGGED OUT: a browser of {b.user} now sees {user!r}")
        return sum(1 for b, u in zip(checked, seen, strict=True) if u == b.user), len(checked)

    async def load(self, base: str, seconds: float) -> tuple[int, int]:
        """Every browser browses for ``seconds``; churners log out and in again. (requests,
        errors)."""
        deadline = time.monotonic() + seconds
        counts = [0, 0]

        async def browse(b: Browser) -> None:
            rng = random.Random(id(b))
            next_churn = time.monotonic() + rng.uniform(1, 3)
            while time.monotonic() < deadline:
                try:
                    if b.churn and time.monotonic() > next_churn:
                        await b.logout(base)
                        await b.login(base)
                        counts[0] += 2
                        next_churn = time.monotonic() + rng.uniform(2, 4)
                    status = await b.get(base, rng.choice(PAGES))
                    counts[0] += 1
                    counts[1] += status != 200
                except (aiohttp.ClientError, TimeoutError, RuntimeError):
                    counts[1] += 1
                await asyncio.sleep(rng.uniform(0.2, 0.6))

        await asyncio.gather(*(browse(b) for b in self.browsers))
        return counts[0], counts[1]


async def totals(client: aioredis.Redis) -> dict[str, int]:
    """The legacy_sessions counters every gateway process adds up in Redis
    (plugins/legacy/stats.py)."""
    got = await client.hgetall("legacy:stats:total")
    return {str(k): int(v) for k, v in got.items()}


def phases(db_url: str) -> list[Phase]:
    def legacy(percent: int, rollback: bool) -> dict[str, Any]:
        return legacy_sessions_options(db_url, rollout_percent=percent, rollback=rollback)

    return [
        Phase(0, "before: the shop keeps its own sessions", "legacy", None),
        Phase(1, "10 %: read-through, the rest pass through", "migrating", legacy(10, True)),
        Phase(2, "100 %: writes to both (rollback window)", "migrating", legacy(100, True)),
        Phase(
            3,
            "Redis only: the table a read-only backup",
            "migrating",
            legacy(100, False),
            zero_writes=True,
        ),
        Phase(
            4, "cut over: no legacy_sessions, shop in gateway mode", "gateway", {}, zero_writes=True
        ),
    ]


def describe(phase: Phase) -> str:
    if phase.legacy is None:
        return "no gateway"
    if not phase.legacy:
        return "plugins: []  (legacy_sessions removed)"
    rb = "rollback: {login, logout}" if phase.legacy.get("rollback") else "no rollback"
    return f"legacy_sessions: rollout_percent: {phase.legacy['rollout_percent']}, {rb}"


async def run(args: argparse.Namespace, workdir: Path) -> int:
    embedded = EmbeddedRedis(workdir / "redis")
    try:
        redis_url = await embedded.start()
    except EmbeddedRedisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    client = aioredis.from_url(redis_url, decode_responses=True)
    demo = Demo(args, workdir)
    results: list[Result] = []
    print(f"shop database {demo.db_url}, redis {redis_url}, logs in {workdir}")
    print(
        f"{len(demo.regulars)} logged-in browsers, {len(demo.guests)} guests, "
        f"{len(demo.churners)} browsers logging out and in; {args.phase_seconds:g} s a phase"
    )
    try:
        for phase in phases(demo.db_url):
            await run_phase(demo, phase, redis_url, client, results, workdir)
    except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
        print(f"\nDEMO FAILED: {type(exc).__name__}: {exc}")
        log = workdir / "gateway.log"
        print(f"(gateway log {log})\n{tail(log, 15)}")
        return 1
    finally:
        for b in demo.browsers:
            await b.http.close()
        await demo.stop_gateway()
        await demo.stop_shop()
        await client.aclose()
        await embedded.stop()
    return report(results)


async def run_phase(
    demo: Demo,
    phase: Phase,
    redis_url: str,
    client: aioredis.Redis,
    results: list[Result],
    workdir: Path,
) -> None:
    print(f"\n[phase {phase.number}] {phase.title}\n    {describe(phase)}")
    await demo.stop_gateway()
    await demo.start_shop(phase.shop_mode)
    config: Path | None = None
    if phase.legacy is not None:
        config = await demo.start_gateway(phase, redis_url)
    base = demo.base(phase)
    if phase.number == 0:
        # The visitors of the shop as it was: logged in through its own login form.
        await asyncio.gather(*(b.login(base) for b in [*demo.regulars, *demo.churners]))
        await asyncio.gather(*(b.get(base, "/") for b in demo.guests))
    before_ok = await demo.check_logged_in(base)
    stats_before = await totals(client)
    shop_before = demo.shop_writes()
    started = time.monotonic()
    requests, errors = await demo.load(base, demo.args.phase_seconds)
    seconds = time.monotonic() - started
    shop_writes = demo.shop_writes() - shop_before
    after_ok = await demo.check_logged_in(base)
    if config is not None and phase.legacy and phase.number == 3:
        await print_status(config, demo)
    await demo.stop_gateway()  # its last counts and writes reach Redis and the table
    stats_after = await totals(client)

    def delta(name: str) -> int:
        return stats_after.get(name, 0) - stats_before.get(name, 0)

    result = Result(
        phase,
        seconds,
        requests=requests,
        shop_writes=shop_writes,
        gateway_writes=delta("writes"),
        reads=delta("reads"),
        sources={s: delta(f"source:{s}") for s in ("gateway", "legacy", "pass-through")},
        logged_in=(min(before_ok[0], after_ok[0]), after_ok[1]),
        errors=errors,
    )
    results.append(result)
    via = result.sources["gateway"] + result.sources["legacy"]
    counted = via + result.sources["pass-through"]
    share = f", {100 * via / counted:.0f} % of them on the gateway's sessions" if counted else ""
    print(f"    {requests} requests ({errors} failed){share}")
    print(
        f"    session writes: {result.writes} ({shop_writes} by the shop, "
        f"{result.gateway_writes} by the gateway's rollback window) = "
        f"{result.per_minute:.0f} per minute; legacy reads by the gateway: {result.reads}"
    )
    print(f"    logged-in browsers still logged in: {result.logged_in[0]}/{result.logged_in[1]}")
    if phase.legacy and phase.legacy.get("rollback") and phase.legacy["rollout_percent"] == 100:
        result.drill = await rollback_drill(demo, phase, redis_url)


async def rollback_drill(demo: Demo, phase: Phase, redis_url: str) -> tuple[int, int]:
    """Turn the gateway's sessions off (rollout 0 %) and back on: everyone, including the
    browsers that logged in through the gateway during the rollback window, must still be
    logged in, by the legacy table alone."""
    assert phase.legacy is not None
    drill = Phase(phase.number, "drill", phase.shop_mode, {**phase.legacy, "rollout_percent": 0})
    await demo.start_gateway(drill, redis_url)
    ok, checked = await demo.check_logged_in(demo.base(drill), churners=True)
    await demo.stop_gateway()
    print(
        f"    rollback drill: rollout_percent 0 (every visitor back on the legacy table): "
        f"{ok}/{checked} browsers still logged in (the {len(demo.churners)} that logged in "
        "again through the gateway among them)"
    )
    return ok, checked


async def print_status(config: Path, demo: Demo) -> None:
    """The operator's cut-over report, as ``python -m gateway migrate status`` prints it."""
    command = [*shlex.split(demo.args.gateway_cmd), "migrate", "status", "--config", str(config)]
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT
    )
    out, _ = await proc.communicate()
    print("    $ python -m gateway migrate status --config " + config.name)
    for line in out.decode(errors="replace").splitlines():
        print("      " + line)


def report(results: list[Result]) -> int:
    print(f"\n  {'phase':<52} {'session writes/min':>18}  logged in")
    for r in results:
        print(
            f"  {r.phase.number} {r.phase.title:<50} {r.per_minute:>18.0f}  "
            f"{r.logged_in[0]:>4}/{r.logged_in[1]}"
        )
    failed = [r for r in results if r.logged_in[0] != r.logged_in[1]]
    failed += [r for r in results if r.phase.zero_writes and r.writes]
    failed += [r for r in results if r.errors]
    failed += [r for r in results if r.drill and r.drill[0] != r.drill[1]]
    if failed:
        print("\nMIGRATION DEMO FAILED: " + ", ".join(f"phase {r.phase.number}" for r in failed))
        return 1
    print("\nNo one was logged out; the database's session writes fell to zero.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.fake_web_retailer.migrate_demo",
        description=(__doc__ or "").split("\n\n")[0],
    )
    parser.add_argument("--phase-seconds", type=float, default=15.0)
    parser.add_argument("--browsers", type=int, default=20, help="logged-in browsers")
    parser.add_argument("--data-dir", type=Path, help="keep the database, configs and logs")
    parser.add_argument(
        "--gateway-cmd",
        default=f"{shlex.quote(sys.executable)} -m gateway",
        help="command that runs the gateway (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    if args.data_dir:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(run(args, args.data_dir.resolve()))
    with tempfile.TemporaryDirectory(prefix="fwr-migrate-") as tmp:
        return asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
