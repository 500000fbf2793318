"""`python -m bench.cpu`: CPU time per request of each server process, d against e.

Req/s on this kind of VM drifts by 2x over a day, so a before/after of a gateway change
measured with two `make bench` runs hours apart says little. This tool measures the cost
instead: it starts the bench's backend, Redis and one gateway (same config, same pinning
as `make bench`), creates sessions through the real login path, then runs wrk against
d (`/nosession/...`) and e (a session page) alternately, `--reps` times each, and reports
per run the CPU microseconds each process spent per completed request (utime + stime
from /proc/<pid>/stat). Alternating d and e in one session makes the two comparable even
while the machine's speed changes. `--profile` adds a py-spy record of the gateway during
the last e run (py-spy must be installed in the venv; it is not a project dependency).

Extra gateway config can be merged in with `--set`, e.g.
`--set session.near_cache.enabled=false` (values are parsed as YAML).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import uvloop
import yaml

from bench import gateway_proc
from bench.procs import (
    PYTHON,
    Children,
    Pinning,
    cpu_seconds,
    free_port,
    log,
    start_redis,
    wait_port,
)
from bench.sessions import login_sessions, write_cookie_file
from bench.wrk import run_wrk

PAGE = "/products/laptop-123"


def apply_set(cfg: dict[str, Any], assignment: str) -> None:
    path, _, raw = assignment.partition("=")
    keys = path.split(".")
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = yaml.safe_load(raw)


async def run(a: argparse.Namespace) -> int:
    pin = Pinning.choose(True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    children = Children()
    rows: list[dict[str, Any]] = []
    try:
        backend_port = free_port()
        backend = children.start(
            "backend",
            pin.wrap([PYTHON, "-m", "bench.backend", "--port", str(backend_port)],
                     pin.server_cpus), tmp)  # fmt: skip
        wait_port(backend, backend_port)
        redis, redis_port = start_redis(children, tmp, pin, "redis")
        gw_port = free_port()
        cfg = gateway_proc.gateway_config(gw_port, redis_port, backend_port)
        for s in a.set:
            apply_set(cfg, s)
        gw = gateway_proc.start_gateway(children, tmp, pin, "gateway", cfg, gw_port)
        url = f"http://127.0.0.1:{gw_port}"
        cookies = write_cookie_file(tmp / "cookies.txt", await login_sessions(url, a.sessions))
        procs = {"gateway": gw.pid, "backend": backend.pid, "redis": redis.pid}
        paths = {"d": "/nosession" + PAGE, "e": PAGE}
        for key in a.only:  # warm-up: pools, near-cache, JIT-less but cache-warm
            await run_wrk(url, paths[key], cookies, tmp, pin, 2, a.connections)
        for rep in range(a.reps):
            for key in a.only:
                last = rep == a.reps - 1 and key == "e"
                spy = None
                if a.profile and last and shutil.which(str(Path(PYTHON).parent / "py-spy")):
                    out = Path(a.profile).resolve()
                    spy = await asyncio.create_subprocess_exec(
                        str(Path(PYTHON).parent / "py-spy"), "record", "-p", str(gw.pid),
                        "-d", str(int(a.dur)), "-r", "200", "-f", "raw", "-o", str(out),
                        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                    )  # fmt: skip
                before = {n: cpu_seconds([p]) for n, p in procs.items()}
                w = await run_wrk(url, paths[key], cookies, tmp, pin, a.dur, a.connections)
                after = {n: cpu_seconds([p]) for n, p in procs.items()}
                if spy is not None:
                    await spy.wait()
                n = max(1, w.requests)
                row: dict[str, Any] = {"scenario": key, "rep": rep, "rps": round(w.rps),
                                       "errors": w.errors, "p99_ms": w.p99_ms}  # fmt: skip
                for name in procs:
                    row[f"{name}_us"] = round((after[name] - before[name]) / n * 1e6)
                rows.append(row)
                log(" ".join(f"{k}={v}" for k, v in row.items()))
    finally:
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        print(json.dumps(rows))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dur", type=float, default=8, help="seconds per wrk run")
    ap.add_argument("--reps", type=int, default=2, help="runs of each scenario")
    ap.add_argument("--only", default="de", help="scenarios, in run order (d, e)")
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--set", action="append", default=[], metavar="KEY.PATH=YAML",
                    help="override a gateway config key")
    ap.add_argument("--profile", metavar="FILE", help="py-spy raw profile of the last e run")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON at the end")
    raise SystemExit(uvloop.run(run(ap.parse_args())))


if __name__ == "__main__":
    main()
