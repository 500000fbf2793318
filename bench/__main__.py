"""`python -m bench [--smoke] [--load-6k] [--out DIR]`: see bench/__init__.py."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench import gateway_proc, idle, nginx_proxy, openresty, pgdb, report, shop, store
from bench.procs import (
    PYTHON,
    ROOT,
    Child,
    Children,
    HarnessError,
    Pinning,
    RssSampler,
    _descendants,
    cpu_seconds,
    ensure_system_package,
    free_port,
    log,
    start_backend,
    start_redis,
    wait_port,
)
from bench.proof import prove
from bench.sessions import (
    GATEWAY_TOP_LEVEL,
    RedisCounter,
    RedisDelta,
    inspect_gateway_sessions,
    login_sessions,
    memory_per_session,
    scrape_gateway_commands,
    seed_sessions,
    write_cookie_file,
)
from bench.wrk import run_wrk

PAGE = "/products/laptop-123"


@dataclass(frozen=True)
class Plan:
    """How big each part of the run is; --smoke shrinks everything to seconds."""

    smoke: bool
    duration: float  # per max-rate scenario
    connections: int
    sessions: int
    fixed_rate: float
    fixed_duration: float
    load_rate: int
    load_duration: float
    load_connections: int
    memory_sessions: int
    store_workers: int
    store_duration: float
    warmup: float
    shop_logins: int  # each is a real scrypt password check in the shop: keep it small
    sessions_large: int  # the "real session count" scenarios (e-100k, o-100k, ...)
    idle_connections: int  # idle keep-alive connections held on one gateway process
    rounds: int  # max-rate rounds per scenario, alternated; the median by req/s is reported

    @classmethod
    def make(cls, a: argparse.Namespace) -> Plan:
        if a.smoke:
            p = cls(True, 2, 4, 50, 200, 2, 200, 2, 8, 2_000, 8, 1, 0, 12, 500, 300, 1)
        else:
            p = cls(False, 10, 64, 1_000, 1_000, 10, 6_000, 60, 128, 100_000, 32, 5, 1, 100,
                    100_000, 10_000, 3)
        over = {k: v for k, v in (("duration", a.duration), ("connections", a.connections),
                                  ("sessions", a.sessions), ("load_duration", a.load_duration),
                                  ("load_rate", a.load_rate),
                                  ("sessions_large", a.sessions_large),
                                  ("idle_connections", a.idle_connections),
                                  ("rounds", a.rounds))
                if v is not None}  # fmt: skip
        return cls(**{**p.__dict__, **over})


@dataclass
class Target:
    """One system under test: where to send load and what to watch while it runs."""

    key: str
    url: str
    path: str
    cookies: Path
    child: Child
    redis_url: str | None = None
    # Commands this system sends at top level (commandstats names); None: it uses no
    # scripts, so every command Redis executes was sent by it.
    top_level: tuple[str, ...] | None = None
    admin_url: str | None = None  # the gateway's /metrics, when one process serves it all
    placement: str = ""  # where its processes run, for the load-test verdict
    backend_pid: int | None = None  # for CPU per request (None: child is the backend)
    redis_pid: int | None = None
    prove: bool = False  # a session scenario: prove the work before measuring it


def cpu_snapshot(t: Target) -> dict[str, float]:
    """CPU seconds so far of the proxy's process tree, the backend and Redis."""
    role = "proxy" if t.backend_pid is not None else "backend"
    out = {role: cpu_seconds(_descendants(t.child.pid))}
    if t.backend_pid is not None:
        out["backend"] = cpu_seconds([t.backend_pid])
    if t.redis_pid is not None:
        out["redis"] = cpu_seconds([t.redis_pid])
    return out


def workers_of(child: Child) -> int:
    # The process tree (nginx master + worker, a gateway's worker processes) at load time.
    return len(_descendants(child.pid))


def redis_per_req(delta: RedisDelta, t: Target, requests: int) -> dict[str, Any]:
    """Commands sent by the proxy and executed by Redis, per completed request."""
    if not requests:
        return {}
    sent = delta.sent(t.top_level)
    sent_cmds = t.top_level or tuple(delta.by_cmd)
    return {
        "redis_sent_per_req": sent / requests,
        "redis_executed_per_req": delta.executed / requests,
        "redis_sent_breakdown": {
            c: round(delta.by_cmd.get(c, 0) / requests, 3) for c in sent_cmds
            if delta.by_cmd.get(c, 0)
        },
        "redis_executed_breakdown": {
            k: round(v / requests, 3)
            for k, v in sorted(delta.by_cmd.items(), key=lambda kv: -kv[1])
        },
        "redis_sent_method": (
            "commandstats calls of " + " + ".join(c.upper() for c in t.top_level)
            if t.top_level
            else "commandstats calls of every command (no scripts: sent = executed)"
        ),
    }


class RedisWatch:
    """Redis counters (and the gateway's own counter, if it has one) around a run."""

    def __init__(self, t: Target) -> None:
        self.t = t
        self.counter = RedisCounter(t.redis_url) if t.redis_url else None
        self.metrics_before: dict[str, float] | None = None

    async def __aenter__(self) -> RedisWatch:
        if self.counter:
            await self.counter.settle()
            await self.counter.start()
        if self.t.admin_url:
            self.metrics_before = await scrape_gateway_commands(self.t.admin_url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.counter and exc[0] is not None:
            await self.counter.close()

    async def result(self, requests: int) -> dict[str, Any]:
        if not self.counter:
            return {}
        await self.counter.settle()
        delta = await self.counter.stop()
        await self.counter.close()
        out = redis_per_req(delta, self.t, requests)
        if self.t.admin_url and self.metrics_before is not None and requests:
            after = await scrape_gateway_commands(self.t.admin_url)
            by_op = {op: v - self.metrics_before.get(op, 0.0) for op, v in after.items()}
            out["metrics_sent_per_req"] = sum(by_op.values()) / requests
            out["metrics_sent_by_op"] = {op: round(v / requests, 3) for op, v in by_op.items()}
        elif self.t.top_level:
            out["metrics_sent_per_req"] = "n/a (per-worker metrics)"
        return out


async def measure_max(t: Target, tmp: Path, pin: Pinning, plan: Plan) -> dict[str, Any]:
    if plan.warmup:
        await run_wrk(t.url, t.path, t.cookies, tmp, pin, plan.warmup, plan.connections)
    async with RedisWatch(t) as watch, RssSampler(t.child.pid) as rss:
        cpu0 = cpu_snapshot(t)
        w = await run_wrk(t.url, t.path, t.cookies, tmp, pin, plan.duration, plan.connections)
        workers = workers_of(t.child)
    d: dict[str, Any] = w.as_dict()
    d["workers"] = workers
    d["peak_rss_mib"] = round(rss.peak_kib / 1024, 1)
    d.update(await watch.result(w.requests))  # waits until write-behind has gone quiet
    cpu1 = cpu_snapshot(t)
    for name, before in cpu0.items():
        d[f"{name}_cpu_us"] = (cpu1[name] - before) / max(1, w.requests) * 1e6
    return d


async def measure_fixed(t: Target, tmp: Path, pin: Pinning, plan: Plan) -> dict[str, Any]:
    """Latency at a fixed rate, measured twice.

    Primary: wrk throttled to the rate by the Lua schedule (a C client, precise to
    microseconds; latency from the send, with `late` counting sends more than 1 ms behind
    schedule, i.e. where coordinated omission could hide a stall). Cross-check: the
    open-loop Python generator, latency from the scheduled time (no coordinated omission,
    but the generator's own jitter is a few ms at p99 on this machine).
    """
    if plan.warmup:
        # Steady state, like the max-rate runs: caches warm, pools and connections open
        # (a cold start sends every session to Redis in the first second).
        await run_wrk(t.url, t.path, t.cookies, tmp, pin, 2 * plan.warmup,
                      max(8, plan.connections), rate=int(plan.fixed_rate))  # fmt: skip
    w = await run_wrk(t.url, t.path, t.cookies, tmp, pin, plan.fixed_duration,
                      max(8, plan.connections), rate=int(plan.fixed_rate))  # fmt: skip
    if w.requests == 0 and w.errors == 0:
        # Nothing completed and nothing failed: the shared machine stalled the whole
        # (short, in smoke mode) run. Once more; a broken proxy fails the second time too.
        log(f"  {t.key}: no request completed in {plan.fixed_duration:g} s; once more")
        w = await run_wrk(t.url, t.path, t.cookies, tmp, pin, plan.fixed_duration,
                          max(8, plan.connections), rate=int(plan.fixed_rate))  # fmt: skip
    d: dict[str, Any] = w.as_dict()
    d["target_rate"] = plan.fixed_rate
    d["achieved_rate"] = round(w.rps, 1)
    cmd = pin.wrap(
        [PYTHON, "-m", "bench.rategen", "--url", t.url + t.path, "--rate", str(plan.fixed_rate),
         "--duration", str(plan.fixed_duration), "--cookies", str(t.cookies),
         "--conns", str(max(8, plan.connections))],
        pin.load_cpus,
    )  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), plan.fixed_duration + 60)
    except TimeoutError:
        proc.kill()
        raise HarnessError(f"rate generator against {t.url} did not finish") from None
    if proc.returncode != 0:
        raise HarnessError(f"rate generator failed: {err.decode()[-500:]}")
    d["open_loop"] = json.loads(out.decode().strip().splitlines()[-1])
    return d


async def measure_load(t: Target, tmp: Path, pin: Pinning, plan: Plan) -> dict[str, Any]:
    """The case study's load test: a constant rate of session requests for a while."""
    log(f"load test: {plan.load_rate:,} req/s for {plan.load_duration:g} s through "
        f"{t.key} ({t.placement})")  # fmt: skip
    async with RedisWatch(t) as watch, RssSampler(t.child.pid) as rss:
        w = await run_wrk(t.url, t.path, t.cookies, tmp, pin, plan.load_duration,
                          plan.load_connections, rate=plan.load_rate)  # fmt: skip
    d: dict[str, Any] = w.as_dict()
    d.update(target_rate=plan.load_rate, achieved_rate=round(w.rps, 1),
             success_rate=1 - w.error_rate, peak_rss_mib=round(rss.peak_kib / 1024, 1),
             placement=t.placement,
             method="wrk throttled by a Lua delay() schedule (wrk2 is not packaged here); "
                    "latency from the actual send")  # fmt: skip
    # "Held" = the rate was delivered (within 1 %) and ≥ 99.9 % of it succeeded; the
    # latency targets are reported separately.
    rate_ok = w.rps >= 0.99 * plan.load_rate
    held = rate_ok and 1 - w.error_rate >= 0.999
    d["held"] = held
    if held:
        d["verdict"] = f"held (schedule late > 1 ms for {w.late:,} sends)"
    elif rate_ok:
        d["verdict"] = (f"NOT held: the rate was delivered but only "
                        f"{(1 - w.error_rate) * 100:.2f} % succeeded")  # fmt: skip
    else:
        d["verdict"] = (
            f"NOT held: {w.rps:,.0f} req/s is the max achieved with {t.placement} "
            f"(schedule fell behind by up to {w.max_lag_ms:,.0f} ms)"
        )
    d.update(await watch.result(w.requests))
    return d


def check_result(key: str, d: dict[str, Any], errors: list[str]) -> None:
    """A scenario that completed nothing, or only errors, means the harness is broken."""
    if d.get("requests", 0) == 0 or d.get("error_rate", 0) >= 0.99:
        errors.append(f"scenario {key}: {d.get('requests', 0)} requests, "
                      f"error rate {d.get('error_rate', 1):.0%}")  # fmt: skip


async def run(a: argparse.Namespace) -> int:
    plan = Plan.make(a)
    pin = Pinning.choose(not a.no_pin)
    out_dir = Path(a.out)
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    children = Children()
    res: dict[str, Any] = {
        "smoke": plan.smoke,
        "machine": report.machine_info(),
        "plan": plan.__dict__,
        "pinning": pin.describe(),
        "scenarios": {},
        "fixed_rate": {},
    }
    notes = [
        f"CPU pinning: {pin.describe()}",
        f"max-rate runs: wrk -t{pin.load_threads()} -c{plan.connections} "
        f"-d{plan.duration:g}s, {plan.sessions:,} session cookies rotated "
        f"({plan.sessions_large:,} in the *-100k scenarios), median of {plan.rounds} "
        "round(s) alternated over the scenarios; "
        "wrk competes with the servers for CPU unless pinned",
        "workers (processes counted during the run): a = 1 aiohttp process (uvloop); "
        "b = nginx worker_processes 1 (+ master); c = 1 aiohttp process; d/e = one gateway "
        "process; f = the gateway with `workers: 2` (supervisor + 2 workers sharing the port "
        "via SO_REUSEPORT)",
        f"f runs on the same CPU set as d/e ({pin.server_cpus or 'all CPUs'}; the workers "
        "inherit the supervisor's taskset affinity) so that e vs f compares one process "
        "with two on identical hardware; on a 2-core machine with wrk pinned to the other "
        "core a second worker can only help by overlapping the first worker's waits",
        "backend, proxy and Redis share the server CPU(s), so each proxied request also "
        "costs context switches between those processes; the machine may be shared with "
        "other work, which adds noise",
        "errors = non-2xx/3xx responses + socket errors (connect/read/write/timeout)",
        "Redis commands/request, counted after waiting for write-behind to go quiet and "
        "divided by wrk's completed requests: **sent** = commands the proxy sends "
        "(gateway: INFO commandstats calls of HGETALL + EVALSHA + PING, which it only sends "
        "at top level; naive proxy: all commands incl. MULTI/EXEC) and **executed** = INFO "
        "total_commands_processed delta (our own INFO calls excluded), which also counts "
        "the commands Redis runs inside the gateway's write-behind Lua script",
    ]
    harness_errors: list[str] = []
    started = time.monotonic()
    try:
        why = ensure_system_package("wrk", "wrk")
        if why:
            raise HarnessError(why)
        # The OpenResty peer's packages first: nginx-light also provides b's nginx.
        peer_missing = openresty.ensure_openresty()
        if peer_missing:
            log(f"OpenResty peer: {peer_missing}; scenarios n, o, o2 are skipped")
        nginx_missing = ensure_system_package("nginx", "nginx")
        gw_missing = gateway_proc.gateway_available(tmp)
        if gw_missing:
            log(f"gateway: {gw_missing}; scenarios d, e and f are skipped")

        log("starting the fast backend")
        backend, backend_port = start_backend(children, tmp, pin)
        backend_url = f"http://127.0.0.1:{backend_port}"
        bpid = backend.pid

        targets: dict[str, Target] = {}
        gw_redis_url = ""
        big = f"{plan.sessions_large:,}"
        if gw_missing is None:
            gw_redis, gw_redis_port = start_redis(children, tmp, pin, "redis-gateway")
            gw_redis_url = f"redis://127.0.0.1:{gw_redis_port}/0"
            gw_port, admin_port = free_port(), free_port()
            # max_connections above the idle test's count, so that a new visitor still
            # gets in while they are all open (the default is 10,000 per process).
            cfg = gateway_proc.gateway_config(
                gw_port, gw_redis_port, backend_port, admin_port=admin_port,
                max_connections=max(10_000, plan.idle_connections + 100),
            )  # fmt: skip
            log("starting the gateway (1 process)")
            gw = gateway_proc.start_gateway(children, tmp, pin, "gateway", cfg, gw_port)
            gw_url = f"http://127.0.0.1:{gw_port}"
            admin_url = f"http://127.0.0.1:{admin_port}"
            wait_port(gw, admin_port)
            log(f"creating {plan.sessions:,} sessions through POST /login on the gateway")
            gw_cookies = write_cookie_file(
                tmp / "cookies-gateway.txt", await login_sessions(gw_url, plan.sessions)
            )
            where = pin.server_cpus or "all"
            one = f"one gateway process on CPU {where}"
            rp = gw_redis.pid
            targets["e"] = Target("e", gw_url, PAGE, gw_cookies, gw, gw_redis_url,
                                  GATEWAY_TOP_LEVEL, admin_url, one, bpid, rp,
                                  prove=True)  # fmt: skip
            targets["d"] = Target("d", gw_url, "/nosession" + PAGE, gw_cookies, gw,
                                  gw_redis_url, GATEWAY_TOP_LEVEL, admin_url, one, bpid,
                                  rp)  # fmt: skip
            # f: the same gateway with `workers: 2`, same Redis and sessions, same CPUs.
            gw2_port = free_port()
            cfg2 = gateway_proc.gateway_config(gw2_port, gw_redis_port, backend_port, workers=2)
            log("starting the gateway with workers: 2")
            gw2 = gateway_proc.start_gateway(children, tmp, pin, "gateway-2w", cfg2, gw2_port)
            two = f"2 gateway workers on CPU {where}"
            gw2_url = f"http://127.0.0.1:{gw2_port}"
            targets["f"] = Target("f", gw2_url, PAGE, gw_cookies, gw2, gw_redis_url,
                                  GATEWAY_TOP_LEVEL, None, two, bpid, rp,
                                  prove=True)  # fmt: skip
            if not a.load_6k:
                # Real session counts: written straight into Redis in the gateway's layout
                # (session:<sha256 hex of the token>, gateway/redis/keys.py), far more than
                # the near-cache holds (near_cache.max_entries, 10,000).
                log(f"writing {big} sessions into the gateway's Redis")
                gw_big = write_cookie_file(
                    tmp / "cookies-gateway-large.txt",
                    await seed_sessions(gw_redis_url, plan.sessions_large),
                )
                targets["e-100k"] = Target("e-100k", gw_url, PAGE, gw_big, gw, gw_redis_url,
                                           GATEWAY_TOP_LEVEL, admin_url, one, bpid, rp,
                                           prove=True)  # fmt: skip
                targets["f-100k"] = Target("f-100k", gw2_url, PAGE, gw_big, gw2, gw_redis_url,
                                           GATEWAY_TOP_LEVEL, None, two, bpid, rp,
                                           prove=True)  # fmt: skip

        if not a.load_6k:
            naive_redis_child, naive_redis_port = start_redis(children, tmp, pin, "redis-naive")
            naive_redis = f"redis://127.0.0.1:{naive_redis_port}/0"
            naive_cookies = write_cookie_file(
                tmp / "cookies-naive.txt", await seed_sessions(naive_redis, plan.sessions)
            )
            naive_port = free_port()
            naive = children.start(
                "naive-proxy",
                pin.wrap([PYTHON, "-m", "bench.naive_proxy", "--port", str(naive_port),
                          "--upstream", backend_url, "--redis", naive_redis],
                         pin.server_cpus), tmp)  # fmt: skip
            wait_port(naive, naive_port)
            targets["a"] = Target("a", backend_url, PAGE, naive_cookies, backend)
            targets["c"] = Target("c", f"http://127.0.0.1:{naive_port}", PAGE, naive_cookies,
                                  naive, naive_redis, backend_pid=bpid,
                                  redis_pid=naive_redis_child.pid)  # fmt: skip
            if nginx_missing is None:
                nginx_port = free_port()
                ng = nginx_proxy.start_nginx(children, tmp, pin, nginx_port, backend_port)
                targets["b"] = Target("b", f"http://127.0.0.1:{nginx_port}", PAGE,
                                      naive_cookies, ng, backend_pid=bpid)  # fmt: skip
            else:
                res["scenarios"]["b"] = {"skipped": nginx_missing}
                harness_errors.append(f"scenario b: {nginx_missing}")
            if peer_missing is None:
                await add_peer_targets(targets, children, tmp, pin, plan, backend_port, bpid)
            else:
                for key in ("n", "o", "o2", "o-100k", "o2-100k"):
                    res["scenarios"][key] = {"skipped": peer_missing}
                harness_errors.append(f"scenarios n, o, o2: {peer_missing}")
            if gw_missing:
                for key in ("d", "e", "f", "e-100k", "f-100k"):
                    res["scenarios"][key] = {"skipped": gw_missing}
                harness_errors.append(f"scenarios d, e, f: {gw_missing}")

            proofs: dict[str, dict[str, Any]] = {}
            for key in report.SCENARIOS:
                t = targets.get(key)
                if t is None or not t.prove:
                    continue
                p = await prove(t.url, t.path, t.cookies.read_text().split("\n", 1)[0],
                                t.redis_url or "")  # fmt: skip
                log(f"proof {key}: {'passed' if p['passed'] else 'FAILED'}: {p['reason']}")
                proofs[key] = p
                if not p["passed"]:
                    res["scenarios"][key] = {"failed": f"proof: {p['reason']}", "proof": p}
                    harness_errors.append(f"scenario {key} failed its proof: {p['reason']}")
                    del targets[key]  # not measured, at max or at the fixed rate
            # Rounds alternate over the scenarios (a, b, ..., then a, b, ... again) so a
            # burst of other work on the machine hits one round of each, not every round
            # of one; the median round by req/s is reported, as in the table.
            rounds: dict[str, list[dict[str, Any]]] = {}
            for r in range(plan.rounds):
                for key in report.SCENARIOS:
                    if key not in targets:
                        continue
                    rr = f" (round {r + 1}/{plan.rounds})" if plan.rounds > 1 else ""
                    log(f"max rate {key}. {report.SCENARIOS[key]}: {plan.duration:g} s{rr}")
                    d = await measure_max(targets[key], tmp, pin, plan)
                    rounds.setdefault(key, []).append(d)
                    log(f"  {d['rps']:,.0f} req/s, p99 {d['p99_ms']:.2f} ms, errors "
                        f"{d['error_rate']:.2%}, CPU µs/req "
                        + ", ".join(f"{n} {d[f'{n}_cpu_us']:.0f}"
                                    for n in ("proxy", "backend", "redis")
                                    if f"{n}_cpu_us" in d)
                        + f", Redis cmds/req sent {report._fmt(d.get('redis_sent_per_req'))}"
                        f" / executed {report._fmt(d.get('redis_executed_per_req'))}, "
                        f"RSS {d['peak_rss_mib']} MiB")  # fmt: skip
                    check_result(key, d, harness_errors)
            for key, runs in rounds.items():
                d = sorted(runs, key=lambda x: x["rps"])[len(runs) // 2]
                d["rounds_rps"] = [x["rps"] for x in runs]
                if key in proofs:
                    d["proof"] = proofs[key]
                res["scenarios"][key] = d
            for key in report.FIXED_RATE:
                if key not in targets:
                    continue
                log(f"fixed {plan.fixed_rate:g} req/s {key}. {report.SCENARIOS[key]}: "
                    f"{plan.fixed_duration:g} s")  # fmt: skip
                f = await measure_fixed(targets[key], tmp, pin, plan)
                res["fixed_rate"][key] = f
                ol = f["open_loop"]
                log(f"  wrk: {f['achieved_rate']:,.0f} req/s, p50 {f['p50_ms']:.2f} ms, "
                    f"p99 {f['p99_ms']:.2f} ms, errors {f['errors']}; open loop: "
                    f"p50 {ol['p50_ms']:.2f} ms, p99 {ol['p99_ms']:.2f} ms")
                check_result(f"fixed-rate {key}", f, harness_errors)
                if ol["requests"] == 0 or ol["errors"] >= ol["requests"]:
                    harness_errors.append(f"open-loop {key}: all requests failed")
            if "e" in targets:
                res["idle"] = await run_idle(targets, plan, harness_errors)

        if "e" in targets:
            res["load_tests"] = await run_load_tests(
                targets, children, tmp, pin, plan, (gw_redis_port, backend_port), harness_errors
            )
            res["load_6k"] = res["load_tests"]["e"]  # the target is defined on e
            res["gateway_sessions"] = await inspect_gateway_sessions(gw_redis_url)
        else:
            res["load_6k"] = {"skipped": gw_missing or "gateway not available"}

        if not a.load_6k:
            children.stop_all()  # the rest measures stores, not proxies
            redis_child, mem_port = start_redis(children, tmp, Pinning(None, None), "redis-mem")
            log(f"Redis memory for {plan.memory_sessions:,} sessions")
            res["memory"] = await memory_per_session(
                f"redis://127.0.0.1:{mem_port}/0", plan.memory_sessions
            )
            log(f"  {res['memory']['bytes_per_session']} bytes/session, "
                f"encoding {res['memory']['encoding']}")
            res["store"] = await run_store(plan, mem_port, redis_child)
            children.stop_all()
            res["shop"] = await shop.run_shop(
                tmp, pin, plan.duration, plan.connections, plan.shop_logins, gw_missing is None
            )
            if "skipped" in res["shop"]:
                log(f"shop: {res['shop']['skipped']}")
    except HarnessError as e:
        harness_errors.append(str(e))
        log(f"HARNESS ERROR: {e}")
    finally:
        children.stop_all()
    res["notes"] = notes
    res["targets16"] = report.evaluate_targets16(res)
    res["targets"] = report.evaluate_targets(res)
    res["claims"] = report.case_study_claims(res)
    res["harness_errors"] = harness_errors
    res["wall_s"] = round(time.monotonic() - started, 1)
    stem = "load6k" if a.load_6k else "latest"
    md = report.write_outputs(res, out_dir, stem)
    print(md)
    log(f"wrote {out_dir}/{stem}.md, {stem}.json, {stem}.png in {res['wall_s']:.0f} s")
    if harness_errors:
        log("harness errors:\n  " + "\n  ".join(harness_errors))
        return 1
    shutil.rmtree(tmp, ignore_errors=True)  # kept on failure: logs of every child are there
    return 0


async def add_peer_targets(
    targets: dict[str, Target],
    children: Children,
    tmp: Path,
    pin: Pinning,
    plan: Plan,
    backend_port: int,
    backend_pid: int,
) -> None:
    """n, o, o2 and their 100k variants: the OpenResty peer on its own Redis.

    Its own Redis, not the gateway's: the gateway's near-cache tracks the keys it read,
    so the peer's writes there would make Redis push invalidations (Redis CPU charged
    to the peer's run). Same key layout and the same seeded fields as the gateway's
    100k sessions.
    """
    redis_child, redis_port = start_redis(children, tmp, pin, "redis-peer")
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    log(f"writing {plan.sessions:,} + {plan.sessions_large:,} sessions into the peer's Redis")
    small = write_cookie_file(tmp / "cookies-peer.txt",
                              await seed_sessions(redis_url, plan.sessions))  # fmt: skip
    large = write_cookie_file(tmp / "cookies-peer-large.txt",
                              await seed_sessions(redis_url, plan.sessions_large))  # fmt: skip
    where = pin.server_cpus or "all"
    rp = redis_child.pid
    port = free_port()
    n = openresty.start_openresty(children, tmp, pin, "nginx-lua", port, backend_port, None)
    targets["n"] = Target("n", f"http://127.0.0.1:{port}", PAGE, small, n,
                          backend_pid=backend_pid)  # fmt: skip
    for key, workers in (("o", 1), ("o2", 2)):
        port = free_port()
        child = openresty.start_openresty(children, tmp, pin, f"openresty-{key}", port,
                                          backend_port, redis_port, workers)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        place = f"{workers} nginx worker(s) on CPU {where}"
        for k, cookies in ((key, small), (f"{key}-100k", large)):
            targets[k] = Target(k, url, PAGE, cookies, child, redis_url, None, None, place,
                                backend_pid, rp, prove=True)  # fmt: skip


async def run_idle(
    targets: dict[str, Target], plan: Plan, harness_errors: list[str]
) -> dict[str, Any]:
    """Idle keep-alive connections on e's gateway process, with 1k and 100k cookies."""
    out: dict[str, Any] = {}
    e = targets["e"]
    port = int(e.url.rsplit(":", 1)[1])
    for label, t in ((f"{plan.sessions:,}", e), (f"{plan.sessions_large:,}",
                                                 targets.get("e-100k"))):  # fmt: skip
        if t is None:
            continue
        log(f"{plan.idle_connections:,} idle keep-alive connections on one gateway process "
            f"({label} sessions)")  # fmt: skip
        try:
            d = await idle.idle_connections("127.0.0.1", port, PAGE, t.cookies,
                                            plan.idle_connections, e.child.pid)  # fmt: skip
        except OSError as exc:
            d = {"connections": plan.idle_connections, "error": repr(exc)}
            harness_errors.append(f"idle connections ({label}): {exc!r}")
        else:
            log(f"  RSS {d['rss_before_mib']} → {d['rss_mib']} MiB, {d['answered_200']:,} "
                f"answered 200, {d['still_open']:,} still open, new request: "
                f"{d['probe_status']}")  # fmt: skip
            if d["answered_200"] == 0:
                harness_errors.append(f"idle connections ({label}): none answered 200: "
                                      f"{d['statuses']} {d['failures']}")  # fmt: skip
        out[label] = d
        await asyncio.sleep(2)  # the gateway closes the last of them
    return out


async def run_load_tests(
    targets: dict[str, Target],
    children: Children,
    tmp: Path,
    pin: Pinning,
    plan: Plan,
    ports: tuple[int, int],
    harness_errors: list[str],
) -> dict[str, Any]:
    """The fixed-rate load test through e (1 process), f (2 workers on the server CPUs)
    and, when pinning is on, a third gateway with 2 workers allowed on every CPU.

    `ports` = (the gateway's Redis, the backend), for that third gateway.
    """
    out: dict[str, Any] = {}
    for key in ("e", "f", "f-unpinned"):
        extra: Child | None = None
        if key == "f-unpinned":
            if pin.server_cpus is None:
                break  # nothing is pinned: f already was the unpinned case
            f = targets["f"]
            port = free_port()
            cfg = gateway_proc.gateway_config(port, *ports, workers=2)
            log("starting the gateway with workers: 2, unpinned")
            extra = gateway_proc.start_gateway(children, tmp, pin, "gateway-2w-unpinned",
                                               cfg, port, unpinned=True)  # fmt: skip
            t = Target(key, f"http://127.0.0.1:{port}", f.path, f.cookies, extra, f.redis_url,
                       f.top_level, None,
                       "2 gateway workers unpinned (all CPUs, shared with wrk)")  # fmt: skip
        else:
            t = targets[key]
        d = await measure_load(t, tmp, pin, plan)
        out[key] = d
        log(f"  achieved {d['achieved_rate']:,.0f} req/s, success "
            f"{d['success_rate']:.3%}, mean {d['mean_ms']:.2f} ms, p95 {d['p95_ms']:.2f} ms")
        check_result(f"load test {key}", d, harness_errors)
        if extra is not None:
            children.stop(extra)
    return out


async def run_store(plan: Plan, redis_port: int, redis_child: Child) -> dict[str, Any]:
    out: dict[str, Any] = {"workers": plan.store_workers, "duration_s": plan.store_duration}
    log(f"session store alone: Redis, {plan.store_workers} workers, {plan.store_duration:g} s")
    out["redis"] = await store.redis_updates(
        f"redis://127.0.0.1:{redis_port}/1", plan.store_workers, plan.store_duration, 1000
    )
    why = await pgdb.pg_available()
    if why:
        out["postgresql"] = {"skipped": why}
        return out
    out["pg_settings"] = await pgdb.durability_settings()
    log(f"session store alone: PostgreSQL, {plan.store_workers} workers")
    async with pgdb.throwaway_db("bench_store") as dsn:
        out["postgresql"] = await store.pg_updates(
            dsn, plan.store_workers, plan.store_duration, 1000
        )
    log(f"  Redis {out['redis']['updates_per_s']:,.0f}/s vs PostgreSQL "
        f"{out['postgresql']['updates_per_s']:,.0f}/s")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="every part for ~2 s at tiny load")
    ap.add_argument("--load-6k", action="store_true", help="only the 6,000 req/s load test")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results directory")
    ap.add_argument("--duration", type=float, help="seconds per max-rate scenario")
    ap.add_argument("--connections", type=int, help="wrk connections")
    ap.add_argument("--sessions", type=int, help="session cookies to rotate")
    ap.add_argument("--load-duration", type=float, help="seconds of the load test (60)")
    ap.add_argument("--load-rate", type=int, help="req/s of the load test (6000)")
    ap.add_argument("--sessions-large", type=int, help="sessions of the *-100k scenarios")
    ap.add_argument("--idle-connections", type=int, help="idle keep-alive connections (10000)")
    ap.add_argument("--rounds", type=int, help="max-rate rounds per scenario, median kept (3)")
    ap.add_argument("--no-pin", action="store_true", help="don't pin with taskset")
    sys.exit(uvloop.run(run(ap.parse_args())))


if __name__ == "__main__":
    main()
