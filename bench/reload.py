"""Reload on SIGHUP under load: does any request fail?

`python -m bench.reload [--duration 20] [--workers 2] [--reloads 8] [--connections 64]`
starts a private redis-server, two backends and the gateway (``workers`` processes, the
cart plugin on, admin listener on), logs one user in, and runs wrk against a session
route with that user's cookie. Meanwhile the config file is rewritten and the gateway
sent SIGHUP ``reloads`` times, each time with one more route (``/new<i>/`` to the second
backend) and the cart plugin's options flipped, so both the route table and the plugin
chain are swapped under load. wrk's own summary counts every socket error, timeout and
non-2xx/3xx answer.

After the run, requests to each new route are checked to reach the second backend (the
reload took effect in every worker), and /metrics must count every reload as ``ok``.
Prints one JSON line with the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.gateway_proc import gateway_config, start_gateway
from bench.procs import (
    Children,
    HarnessError,
    Pinning,
    free_port,
    log,
    start_backend,
    start_redis,
    wait_port,
)

LUA = """
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d %.3f %.3f\\n", summary.requests,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.status,
    summary.errors.timeout, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def config(
    port: int, admin: int, redis_port: int, backends: list[int], workers: int, n: int
) -> Any:
    cfg: dict[str, Any] = gateway_config(
        port, redis_port, backends[0], admin_port=admin, workers=workers
    )
    cfg["upstreams"]["other"] = {"servers": [f"http://127.0.0.1:{backends[1]}"]}
    for i in range(n):
        cfg["routes"].insert(0, {"path": f"/new{i}/", "upstream": "other", "session": "optional"})
    cfg["plugins"] = [{"cart": {"contents_header": n % 2 == 1}}]
    cfg["routes"][-1]["instructions"] = ["cart"]
    return cfg


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    children = Children()
    pin = Pinning.choose(not args.no_pin)
    try:
        _, redis_port = start_redis(children, tmp, pin, "redis")
        _, b1 = start_backend(children, tmp, pin)
        # A second backend for the new routes (start_backend names its log "backend").
        b2 = free_port()
        other = children.start(
            "backend2", pin.wrap([sys.executable, "-m", "bench.backend", "--port", str(b2)],
                                 pin.server_cpus), tmp)  # fmt: skip
        wait_port(other, b2)
        port, admin = free_port(), free_port()
        first = config(port, admin, redis_port, [b1, b2], args.workers, 0)
        gw = start_gateway(children, tmp, pin, "gateway", first, port)
        path = tmp / "gateway.yaml"  # where start_gateway wrote it
        await asyncio.sleep(1.0)  # every worker listening
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/login?user=7") as r:
                token = r.cookies["sid"].value
        lua = tmp / "count.lua"
        lua.write_text(LUA)
        wrk = [
            "wrk", "-t", str(pin.load_threads()), "-c", str(args.connections),
            "-d", f"{args.duration}s", "--timeout", "5s", "-s", str(lua),
            "-H", f"Cookie: sid={token}", base + "/page",
        ]  # fmt: skip
        log(f"wrk {' '.join(wrk[1:9])} against {args.workers} workers, {pin.describe()}")
        proc = await asyncio.create_subprocess_exec(
            *pin.wrap(wrk, pin.load_cpus), stdout=asyncio.subprocess.PIPE
        )
        await asyncio.sleep(1.0)
        # --reloads 0: the same run without a reload, for comparison.
        interval = (args.duration - 2.0) / max(args.reloads, 1)
        for i in range(1, args.reloads + 1):
            path.write_text(
                yaml.safe_dump(config(port, admin, redis_port, [b1, b2], args.workers, i))
            )
            gw.proc.send_signal(signal.SIGHUP)
            log(f"SIGHUP {i}: route /new{i - 1}/ added, cart options flipped")
            await asyncio.sleep(interval)
        out = (await proc.communicate())[0].decode()
        m = re.search(r"^RESULT (.*)$", out, re.M)
        if not m:
            raise HarnessError(f"no result from wrk:\n{out}")
        fields = m.group(1).split()
        reqs, conn, read, write, status, timeout = (int(x) for x in fields[:6])
        p50, p99 = float(fields[6]), float(fields[7])
        rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
        # Did every reload take effect in every worker? New connections land on either.
        reached = 0
        for i in range(args.reloads):
            for _ in range(4):
                async with aiohttp.ClientSession() as one:
                    async with one.get(f"{base}/new{i}/x") as r:
                        reached += r.status == 200
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{admin}/metrics") as r:
                text = await r.text()
        ok = re.search(r'^gateway_config_reloads_total\{outcome="ok"\} ([\d.e+]+)$', text, re.M)
        by_route = sum(
            float(v)
            for v in re.findall(
                r'^gateway_requests_total\{route="/new\d+/",status_class="2xx"\} ([\d.e+]+)$',
                text,
                re.M,
            )
        )
        log_text = gw.log_path.read_text(errors="replace")
        return {
            "workers": args.workers,
            "connections": args.connections,
            "duration_s": args.duration,
            "reloads": args.reloads,
            "requests": reqs,
            "requests_per_s": float(rps.group(1)) if rps else None,
            "errors": {
                "connect": conn,
                "read": read,
                "write": write,
                "status": status,
                "timeout": timeout,
            },
            "failed": conn + read + write + status + timeout,
            "latency_ms": {"p50": p50, "p99": p99},
            "reloads_logged": log_text.count("config reloaded from"),
            "reloads_ok_metric": float(ok.group(1)) if ok else None,
            "new_route_requests_ok": reached,
            "new_route_requests_counted": by_route,
            "new_route_requests_sent": 4 * args.reloads,
        }
    finally:
        children.stop_all()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reloads", type=int, default=8)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--no-pin", action="store_true", help="do not pin wrk and the servers")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-reload-") as tmp:
        started = time.monotonic()
        result = asyncio.run(run(args, Path(tmp)))
    result["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
