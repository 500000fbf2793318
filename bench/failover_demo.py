"""``make failover-demo``: the case study's failure-recovery matrix, measured here.

The case study (``demo_failover_scenarios.py``) promises, for a Redis master failure,
detection < 5 s, recovery < 10 s and "minimal" data loss. This script measures what the
gateway gives on this machine, with real processes on loopback:

1. **Sentinel**: a master, two replicas and three Sentinels (quorum 2, down-after
   1000 ms), a gateway process (``redis.sentinel``, ``redis.wait: {replicas: 1}``), an
   in-process backend, and steady load from virtual users who log in, view pages on
   open, required and closed routes, and log out. The master is killed (SIGKILL).
2. **Cluster**: three masters with two replicas each, the same gateway on
   ``redis.cluster`` and the same load; one master is killed.

For each it prints when the failure was detected, when a new master was named, when the
gateway's first write (an acknowledged login) landed on it, the requests answered and
failed in that window by route policy, and then, checked against Redis: acknowledged
logins lost, acknowledged logouts whose session came back, and page views (activity)
the backend saw that Redis does not count.

``python -m bench.failover_demo [--load-seconds S] [--after-seconds S] [--users N]
[--only sentinel|cluster] [--no-wait]``
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import itertools
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis
import yaml
from aiohttp import web

from bench.topology import ClusterTopology, SentinelTopology, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("open", "required", "closed", "login", "logout")


# -- the backend: a legacy app that logs users in and out, and counts what it saw ---------


@dataclasses.dataclass
class Backend:
    seen: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    async def handle(self, request: web.Request) -> web.Response:
        resp = web.Response(text="ok")
        if request.path == "/login":
            resp.headers["X-Session-Login"] = f"user_id={request.query.get('u', 'x')}"
        elif request.path == "/logout":
            resp.headers["X-Session-Logout"] = "this"
        elif request.headers.get("X-Session-Authenticated") == "true":
            # Every request of a session the backend sees is a page view the gateway
            # records (write-behind): what Redis must count in the end.
            self.seen[request.headers["X-Session-Id"]] += 1
        return resp

    async def start(self) -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner, port


# -- the gateway, as a process ----------------------------------------------------------


def gateway_config(port: int, backend: int, redis_section: dict[str, Any]) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{port}",
        "redis": {"timeout": 0.5, "connect_timeout": 0.5, **redis_section},
        "session": {
            "cookie": {"name": "sid", "secure": False},
            "idle_ttl": 3600,
            "absolute_ttl": 28800,
        },
        "activity": {"flush_interval": 0.1},
        "limits": {"upstream_per_address": 100_000, "guests_per_address": 0},
        "upstreams": {"app": {"servers": [f"http://127.0.0.1:{backend}"]}},
        "routes": [
            {"path": "/login", "upstream": "app", "instructions": ["login"]},
            {"path": "/logout", "upstream": "app", "instructions": ["logout"]},
            {"path": "/account/", "upstream": "app", "session": "required"},
            {"path": "/closed/", "upstream": "app", "on_redis_error": "closed"},
            {"path": "/", "upstream": "app"},
        ],
        "logging": {"level": "WARNING"},
    }


def start_gateway(work: Path, cfg: dict[str, Any]) -> subprocess.Popen[bytes]:
    path = work / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = (work / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--config", str(path)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    port = int(cfg["listen"].rpartition(":")[2])

    def listening() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited: {(work / 'gateway.log').read_text()}")
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until("gateway listening", listening, 20)
    return proc


# -- the load -----------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    at: float
    kind: str
    status: int
    authenticated: bool = False
    sid: str = ""  # the session an acknowledged login created


@dataclasses.dataclass
class Load:
    url: str
    backend: Backend
    users: int
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    # session id -> "live" (login acknowledged), "out" (logout acknowledged),
    # "unsure" (a logout answered 503: it may or may not have happened)
    state: dict[str, str] = dataclasses.field(default_factory=dict)
    stop: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def user(self, n: int) -> None:
        from gateway.redis import public_id

        rnd = random.Random(n)
        token: str | None = None
        pages = itertools.cycle(["/p/1", "/account/a", "/p/2", "/closed/c", "/p/3"])
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), timeout=timeout
        ) as s:
            while not self.stop.is_set():
                try:
                    if token is None:
                        async with s.post(f"{self.url}/login?u=u{n}") as r:
                            await r.read()
                            cookie = r.cookies.get("sid")
                            ok = r.status == 200 and cookie is not None and bool(cookie.value)
                            sid = public_id(cookie.value) if ok and cookie is not None else ""
                            self.outcomes.append(
                                Outcome(time.monotonic(), "login", r.status, sid=sid)
                            )
                            if ok and cookie is not None:
                                token = cookie.value
                                self.state[sid] = "live"
                    elif rnd.random() < 0.04:
                        sid = public_id(token)
                        async with s.post(f"{self.url}/logout", cookies={"sid": token}) as r:
                            await r.read()
                            self.outcomes.append(Outcome(time.monotonic(), "logout", r.status))
                            self.state[sid] = "out" if r.status == 200 else "unsure"
                        # Either way the cookie is gone (the gateway expires it).
                        token = None
                    else:
                        path = next(pages)
                        kind = {"p": "open", "account": "required", "closed": "closed"}[
                            path.split("/")[1]
                        ]
                        sid = public_id(token)
                        before = self.backend.seen[sid]
                        async with s.get(f"{self.url}{path}", cookies={"sid": token}) as r:
                            await r.read()
                        self.outcomes.append(
                            Outcome(
                                time.monotonic(), kind, r.status, self.backend.seen[sid] > before
                            )
                        )
                except (aiohttp.ClientError, TimeoutError) as e:
                    self.outcomes.append(Outcome(time.monotonic(), "error", 0))
                    print(f"  client error: {type(e).__name__}: {e}", flush=True)
                await asyncio.sleep(rnd.uniform(0.01, 0.04))

    async def run(self) -> None:
        await asyncio.gather(*(self.user(n) for n in range(self.users)))


# -- one scenario ---------------------------------------------------------------------


@dataclasses.dataclass
class Timeline:
    kill: float = 0.0
    detected: float | None = None  # a Sentinel's +sdown, or a node flagged as failing
    confirmed: float | None = None  # +odown (quorum), or the node marked FAIL
    new_master: float | None = None  # the Sentinels name another master / slots moved
    first_write: float | None = None  # the first login acknowledged on the new master


@dataclasses.dataclass
class Result:
    name: str
    timeline: Timeline
    window: dict[str, collections.Counter[str]]
    logins: int
    logins_lost: int
    logouts: int
    logouts_back: int
    views: int
    views_lost: int
    views_twice: int
    unsure: int
    after: collections.Counter[str]


def watch_sentinel(topo: SentinelTopology, tl: Timeline, old: int, stop: threading.Event) -> None:
    """Poll the Sentinels every 20 ms for the failover's milestones."""
    while not stop.is_set():
        now = time.monotonic()
        for s in topo.sentinels:
            try:
                with s.client(0.2) as c:
                    m = c.sentinel_master(topo.master_name)
            except redis.RedisError:
                continue
            flags = str(m.get("flags", ""))
            if tl.detected is None and ("s_down" in flags or m["port"] != old):
                tl.detected = now
            if tl.confirmed is None and ("o_down" in flags or m["port"] != old):
                tl.confirmed = now
            if tl.new_master is None and m["port"] != old:
                tl.new_master = now
        if tl.new_master is not None:
            return
        time.sleep(0.02)


def watch_cluster(topo: ClusterTopology, tl: Timeline, dead: int, stop: threading.Event) -> None:
    node_id = ""
    while not stop.is_set():
        now = time.monotonic()
        for n in topo.nodes.values():
            if n.port == dead or not n.alive:
                continue
            try:
                with n.client(0.2) as c:
                    text = c.execute_command("CLUSTER", "NODES")
            except redis.RedisError:
                continue
            lines = text.splitlines() if isinstance(text, str) else []
            for line in lines:
                fields = line.split()
                if len(fields) > 2 and fields[1].startswith(f"127.0.0.1:{dead}@"):
                    node_id = fields[0]
                    if tl.detected is None and "fail" in fields[2]:
                        tl.detected = now
                    if tl.confirmed is None and "fail" in fields[2].split(","):
                        tl.confirmed = now
            break
        try:
            if tl.new_master is None and dead not in topo.slot_owners():
                tl.new_master = now
        except (redis.RedisError, RuntimeError):
            pass
        if tl.new_master is not None and node_id:
            return
        time.sleep(0.02)


async def scenario(
    name: str,
    work: Path,
    redis_section: dict[str, Any],
    kill: Any,
    watch: Any,
    sessions: Any,
    in_victim: Any,
    users: int,
    load_seconds: float,
    after_seconds: float,
) -> Result:
    backend = Backend()
    runner, backend_port = await backend.start()
    port = free_port()
    gw = start_gateway(work, gateway_config(port, backend_port, redis_section))
    load = Load(f"http://127.0.0.1:{port}", backend, users)
    tl = Timeline()
    try:
        task = asyncio.create_task(load.run())
        print(f"  steady load: {users} users for {load_seconds:g} s", flush=True)
        await asyncio.sleep(load_seconds)
        stop = threading.Event()
        victim = await asyncio.to_thread(kill, tl)
        watcher = asyncio.create_task(asyncio.to_thread(watch, tl, victim, stop))
        print("  master killed (SIGKILL)", flush=True)
        deadline = time.monotonic() + 60
        while tl.first_write is None and time.monotonic() < deadline:
            for o in load.outcomes[-400:]:
                if o.kind == "login" and o.sid and o.at > tl.kill and in_victim(o.sid):
                    tl.first_write = o.at
                    break
            await asyncio.sleep(0.05)
        await asyncio.wait_for(watcher, 30)
        stop.set()
        print(f"  recovered; load goes on for {after_seconds:g} s", flush=True)
        await asyncio.sleep(after_seconds)
        load.stop.set()
        await task
        # The last activity flushed (flush interval 0.1 s, retries back off up to 5 s).
        await asyncio.sleep(3.0)
        stored = await asyncio.to_thread(sessions, list(load.state))
    finally:
        gw.terminate()
        try:
            gw.wait(20)
        except subprocess.TimeoutExpired:
            gw.kill()
        await runner.cleanup()
    end = tl.first_write or time.monotonic()
    window: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in KINDS}
    for o in load.outcomes:
        if tl.kill <= o.at <= end and o.kind in window:
            c = window[o.kind]
            if o.status >= 500 or o.status == 0:
                c[f"{o.status}"] += 1
            elif o.kind == "open" and not o.authenticated:
                c["anonymous"] += 1
            else:
                c["ok"] += 1
    after: collections.Counter[str] = collections.Counter()
    for o in load.outcomes:
        if o.at > end:
            after["requests"] += 1
            if o.status >= 500 or o.status == 0:
                after[f"{o.kind} {o.status}"] += 1
            elif o.kind == "open" and not o.authenticated:
                after["open anonymous"] += 1
    live = [s for s, st in load.state.items() if st == "live"]
    out = [s for s, st in load.state.items() if st == "out"]
    logins_lost = sum(1 for s in live if stored.get(s) is None)
    logouts_back = sum(1 for s in out if stored.get(s) is not None)
    views = sum(backend.seen[s] for s in live)
    lost = sum(max(0, backend.seen[s] - (stored.get(s) or 0)) for s in live)
    twice = sum(max(0, (stored.get(s) or 0) - backend.seen[s]) for s in live)
    unsure = sum(1 for st in load.state.values() if st == "unsure")
    return Result(
        name, tl, window, len(load.state), logins_lost, len(out), logouts_back, views, lost,
        twice, unsure, after,
    )  # fmt: skip


def _page_views(client: Any, keys: list[tuple[str, str]]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for sid, key in keys:
        v = client.hget(key, "page_views")
        out[sid] = None if v is None else int(v)
    return out


async def run_sentinel(base: Path, args: argparse.Namespace) -> Result:
    print("\n== Sentinel: a master, two replicas, three Sentinels (down-after 1000 ms)", flush=True)
    topo = SentinelTopology(base / "sentinel")
    await asyncio.to_thread(topo.start)
    try:
        old = topo.master_port()

        def kill(tl: Timeline) -> int:
            tl.kill = time.monotonic()
            topo.data[old].kill()
            return old

        def stored(sids: list[str]) -> dict[str, int | None]:
            with topo.master.client() as c:
                return _page_views(c, [(s, f"session:{s}") for s in sids])

        section: dict[str, Any] = {"sentinel": topo.config(check_interval=0.2)}
        if not args.no_wait:
            section["wait"] = {"replicas": 1, "timeout": 0.2}
        return await scenario(
            "Redis master (Sentinel), SIGKILL",
            _mkdir(base / "gw-sentinel"),
            section,
            kill,
            lambda tl, victim, stop: watch_sentinel(topo, tl, victim, stop),
            stored,
            lambda sid: True,  # one master: every login after the kill is on the new one
            args.users,
            args.load_seconds,
            args.after_seconds,
        )
    finally:
        topo.close()


async def run_cluster(base: Path, args: argparse.Namespace) -> Result:
    print("\n== Cluster: three masters with two replicas each (node timeout 1000 ms)", flush=True)
    topo = ClusterTopology(base / "cluster", replicas=2)
    await asyncio.to_thread(topo.start)
    try:
        masters = topo.slot_owners()
        victim = sorted(masters)[0]
        slots = {
            s
            for start, end, *owners in topo.slots()
            if int(owners[0][1]) == victim
            for s in range(int(start), int(end) + 1)
        }
        from gateway.redis.cluster import slot_of

        def kill(tl: Timeline) -> int:
            tl.kill = time.monotonic()
            topo.nodes[victim].kill()
            return victim

        def stored(sids: list[str]) -> dict[str, int | None]:
            rc = topo.client()
            try:
                return _page_views(rc, [(s, f"session:{{{s}}}") for s in sids])
            finally:
                rc.close()

        def in_victim(sid: str) -> bool:
            # A login whose session is in the dead master's slots.
            return slot_of(f"session:{{{sid}}}") in slots

        section: dict[str, Any] = {"cluster": topo.config()}
        if not args.no_wait:
            section["wait"] = {"replicas": 1, "timeout": 0.2}
        return await scenario(
            "Redis Cluster master, SIGKILL",
            _mkdir(base / "gw-cluster"),
            section,
            kill,
            lambda tl, dead, stop: watch_cluster(topo, tl, dead, stop),
            stored,
            in_victim,
            args.users,
            args.load_seconds,
            args.after_seconds,
        )
    finally:
        topo.close()


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# -- the report -------------------------------------------------------------------------


def _s(t: float | None, since: float) -> str:
    return "-" if t is None else f"{t - since:.2f} s"


def report(results: list[Result], args: argparse.Namespace) -> str:
    out = []
    wait = "off" if args.no_wait else "on (replicas: 1, timeout: 0.2 s)"
    out.append("")
    out.append(
        f"Failure-recovery matrix (this machine: {os.cpu_count()} cores, loopback; "
        f"{args.users} users; redis.wait {wait})"
    )
    out.append("")
    out.append(
        "| failure | detected | confirmed | new master | first write on it | "
        "logins lost | logouts resurrected | activity updates lost |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    for r in results:
        t = r.timeline
        out.append(
            f"| {r.name} | {_s(t.detected, t.kill)} | {_s(t.confirmed, t.kill)} | "
            f"{_s(t.new_master, t.kill)} | {_s(t.first_write, t.kill)} | "
            f"{r.logins_lost} of {r.logins} | {r.logouts_back} of {r.logouts} | "
            f"{r.views_lost} of {r.views}"
            + (f" ({r.views_twice} counted twice)" if r.views_twice else "")
            + " |"
        )
    out.append("")
    out.append(
        "Requests from the kill to the first write on the new master, by route policy "
        "(ok = served; anonymous = an open route served without the session):"
    )
    out.append("")
    out.append("| failure | route | ok | anonymous | 503 | other 5xx / errors |")
    out.append("|---|---|---|---|---|---|")
    labels = {
        "open": "open (on_redis_error: open)",
        "required": "required (session: required)",
        "closed": "closed (on_redis_error: closed)",
        "login": "login (X-Session-Login)",
        "logout": "logout (X-Session-Logout)",
    }
    for r in results:
        for kind in KINDS:
            c = r.window[kind]
            other = sum(v for k, v in c.items() if k not in ("ok", "anonymous", "503"))
            out.append(
                f"| {r.name} | {labels[kind]} | {c['ok']} | {c['anonymous']} | {c['503']} | "
                f"{other} |"
            )
    out.append("")
    for r in results:
        failed = {k: v for k, v in r.after.items() if k != "requests"}
        out.append(
            f"{r.name}: after the first write, {r.after['requests']} requests, "
            + (", ".join(f"{v} {k}" for k, v in sorted(failed.items())) or "none failed")
            + "."
        )
    for r in results:
        if r.unsure:
            out.append(
                f"{r.name}: {r.unsure} logouts answered 503 (not acknowledged; the client "
                "was told to retry) are counted neither way."
            )
    out.append(
        "Detected: a Sentinel's +sdown (a cluster node flagging the master PFAIL); "
        "confirmed: +odown (FAIL); new master: the Sentinels name another one (the "
        "dead master's slots served by its replica); first write: the first login the "
        "gateway acknowledged on it (Sentinel: any login; cluster: one whose session is "
        "in the dead master's slots). Case study target: detection < 5 s, recovery < 10 s."
    )
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="failover-demo-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        results = []
        if args.only in (None, "sentinel"):
            results.append(await run_sentinel(base, args))
        if args.only in (None, "cluster"):
            results.append(await run_cluster(base, args))
    print(report(results, args), flush=True)
    bad = [r for r in results if r.logins_lost or r.logouts_back or r.views_lost]
    return 1 if bad and not args.no_wait else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.failover_demo", description=__doc__)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--load-seconds", type=float, default=4.0)
    ap.add_argument("--after-seconds", type=float, default=4.0)
    ap.add_argument("--only", choices=("sentinel", "cluster"), default=None)
    ap.add_argument("--no-wait", action="store_true", help="redis.wait off (to compare)")
    ap.add_argument("--keep", default=None, help="a directory for the logs, kept after")
    return asyncio.run(main_async(ap.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
