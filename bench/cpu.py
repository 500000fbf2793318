"""`python -m bench.cpu`: CPU time per request of each server process, d against e.

Req/s on this kind of VM drifts by 2x over a day, so a before/after of a gateway change
measured with two `make bench` runs hours apart says little. This tool measures the cost
instead: it starts the bench's backend, Redis and one gateway (same config, same pinning
as `make bench`), creates sessions through the real login path, then runs wrk against
d (`/nosession/...`) and e (a session page) alternately, `--reps` times each, and reports
per run the CPU microseconds each process spent per completed request (utime + stime
from /proc/<pid>/stat). Alternating d and e in one session makes the two comparable even
while the machine's speed changes. `--profile DIR` adds a py-spy record of the gateway during
the last run of each scenario, as DIR/<scenario>.txt in py-spy's raw format (py-spy must
be installed in the venv; it is not a project dependency); `--native` adds native
frames, and `python -m bench.profile DIR/e.txt DIR/x.txt` sums them up by part.
Sampling costs the gateway CPU, so the µs of a profiled run read high.

Extra gateway config can be merged in with `--set`, e.g.
`--set session.near_cache.enabled=false` (values are parsed as YAML). Scenario x is e
through a second gateway, configured with `--set-x` and/or run from another checkout
with `--x-root` (a before/after of a code change in one session: `--only ex --x-root
/tmp/base`). Each gateway has its own Redis and its own sessions. A gateway left idle
while the others run longer than `near_cache.max_age` starts its next run with expired
copies: `hgetall` (session reads per request) shows those first misses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
import yaml

from bench import gateway_proc
from bench.procs import (
    PYTHON,
    Child,
    Children,
    Pinning,
    cpu_seconds,
    free_port,
    log,
    start_backend,
    start_redis,
)
from bench.sessions import RedisCounter, login_sessions, write_cookie_file
from bench.wrk import run_wrk

PAGE = "/products/laptop-123"


@dataclass(frozen=True)
class Gateway:
    """One gateway under measurement, with its own Redis and sessions."""

    url: str
    proc: Child
    redis: Child
    redis_port: int
    cookies: Path


def apply_set(cfg: dict[str, Any], assignment: str) -> None:
    """`a.b.2.c=YAML`: a number picks a list item (`routes.2` is the catch-all route)."""
    path, _, raw = assignment.partition("=")
    *parents, last = path.split(".")
    node: Any = cfg
    for k in parents:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    if isinstance(node, list):
        node[int(last)] = yaml.safe_load(raw)
    else:
        node[last] = yaml.safe_load(raw)


async def run(a: argparse.Namespace) -> int:
    spy_bin = Path(PYTHON).parent / "py-spy"
    if a.profile and not spy_bin.exists():
        log(f"--profile needs py-spy: {Path(PYTHON).parent / 'pip'} install py-spy")
        return 2
    pin = Pinning.choose(True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    children = Children()
    rows: list[dict[str, Any]] = []
    try:
        backend, backend_port = start_backend(children, tmp, pin)
        gws: dict[str, Gateway] = {}  # by scenario; d shares e's
        for key, sets in (("e", a.set), ("x", a.set_x)):
            if key not in a.only and not (key == "e" and "d" in a.only):
                continue
            # A Redis per gateway: with a shared one, each gateway's writes would empty
            # the other's near-cache between their runs.
            redis, redis_port = start_redis(children, tmp, pin, f"redis-{key}")
            port = free_port()
            cfg = gateway_proc.gateway_config(port, redis_port, backend_port)
            for s in sets:
                apply_set(cfg, s)
            name = "gateway" if key == "e" else "gateway-x"
            root = Path(a.x_root).resolve() if key == "x" and a.x_root else None
            proc = gateway_proc.start_gateway(children, tmp, pin, name, cfg, port, root=root)
            url = f"http://127.0.0.1:{port}"
            cookies = write_cookie_file(
                tmp / f"cookies-{key}.txt", await login_sessions(url, a.sessions)
            )
            gws[key] = Gateway(url, proc, redis, redis_port, cookies)
        if "d" in a.only:
            gws["d"] = gws["e"]
        paths = {"d": "/nosession" + PAGE, "e": PAGE, "x": PAGE}
        for key in a.only:  # warm-up: pools, near-cache
            g = gws[key]
            await run_wrk(g.url, paths[key], g.cookies, tmp, pin, 2, a.connections, rate=a.rate)
        for rep in range(a.reps):
            for key in a.only:
                g = gws[key]
                procs = {"gateway": g.proc.pid, "backend": backend.pid, "redis": g.redis.pid}
                spy = None
                if a.profile and rep == a.reps - 1:
                    out = Path(a.profile).resolve() / f"{key}.txt"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    spy = await asyncio.create_subprocess_exec(
                        str(spy_bin), "record", "-p", str(g.proc.pid),
                        "-d", str(int(a.dur)), "-r", "200", "-f", "raw", "-o", str(out),
                        *(["--native"] if a.native else []),
                        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                    )  # fmt: skip
                counter = RedisCounter(f"redis://127.0.0.1:{g.redis_port}/0")
                await counter.start()
                before = {n: cpu_seconds([p]) for n, p in procs.items()}
                sys_before = cpu_seconds([g.proc.pid], system_only=True)
                w = await run_wrk(g.url, paths[key], g.cookies, tmp, pin, a.dur, a.connections,
                                  rate=a.rate)  # fmt: skip
                after = {n: cpu_seconds([p]) for n, p in procs.items()}
                sys_after = cpu_seconds([g.proc.pid], system_only=True)
                delta = await counter.stop()
                await counter.close()
                if spy is not None:
                    await spy.wait()
                n = max(1, w.requests)
                row: dict[str, Any] = {"scenario": key, "rep": rep, "rps": round(w.rps),
                                       "errors": w.errors, "p50_ms": w.p50_ms,
                                       "p99_ms": w.p99_ms}  # fmt: skip
                for name in procs:
                    row[f"{name}_us"] = round((after[name] - before[name]) / n * 1e6)
                # The kernel's part of the gateway's (stime): its socket calls. py-spy
                # cannot tell it apart, as it also charges a thread preempted in a
                # write to that write.
                row["gateway_sys_us"] = round((sys_after - sys_before) / n * 1e6)
                # Session reads that missed the near-cache (the script never sends one).
                row["hgetall"] = round(delta.by_cmd.get("hgetall", 0) / n, 3)
                rows.append(row)
                log(" ".join(f"{k}={v}" for k, v in row.items()))
    finally:
        children.stop_all()
        if a.keep:
            log(f"kept {tmp} (configs and every process's log)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        print(json.dumps(rows))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.cpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--dur", type=float, default=8, help="seconds per wrk run")
    ap.add_argument("--reps", type=int, default=2, help="runs of each scenario")
    ap.add_argument(
        "--only",
        default="de",
        help="scenarios, in run order: d, e, x (e through a second gateway "
        "configured with --set-x)",
    )
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--rate", type=int, default=0, help="fixed req/s (0: max rate)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=YAML",
        help="override a config key of the gateway serving d and e",
    )
    ap.add_argument(
        "--set-x",
        action="append",
        default=[],
        metavar="KEY.PATH=YAML",
        help="override a config key of the second gateway (scenario x)",
    )
    ap.add_argument(
        "--x-root",
        metavar="DIR",
        help="run scenario x's gateway from another checkout, e.g. a "
        "`git worktree add /tmp/base HEAD` for a before/after",
    )
    ap.add_argument("--profile", metavar="DIR", help="py-spy raw profiles of the last runs")
    ap.add_argument(
        "--native",
        action="store_true",
        help="with --profile: native frames too (the socket syscalls show as such); "
        "summarize with python -m bench.profile",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON at the end")
    raise SystemExit(uvloop.run(run(ap.parse_args())))


if __name__ == "__main__":
    main()
