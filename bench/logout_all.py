"""Logout everywhere for a user whose session index has grown huge: how long it blocks
Redis for everyone else.

`python -m bench.logout_all [--members 136000] [--real 100] [--root DIR] [--timeout S]`
starts a private redis-server and the gateway of checkout DIR (default: this one) as a
process (plugins cart and viewed_items on), logs user 7 in through it, fills
user_sessions:7 with MEMBERS ids of sessions that expired and REAL live sessions (each
with a cart), and has the backend answer `X-Session-Logout: all`. Meanwhile another
client loops HGETALL on its own connection with a 50 ms timeout. Prints the longest
command in SLOWLOG (threshold 10 µs: a script's inner commands, about 1 µs each, stay
out of it), the logout's wall time, and the other client's calls and failures.
Run it with two roots for a before/after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
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
from redis.backoff import NoBackoff
from redis.retry import Retry

from bench.procs import ROOT, free_port

UID = "7"


def _probe(port: int, stop: threading.Event, out: dict[str, Any]) -> None:
    """Another user's requests: HGETALL of one session on a connection of its own."""
    # No retries: redis-py (8.x) retries a timed-out call 10 times by default, which
    # would hide the very stall measured here.
    r = redis.Redis(
        port=port, socket_timeout=0.05, decode_responses=True, retry=Retry(NoBackoff(), 0)
    )
    r.hset("session:probe", mapping={"user_id": "8"})
    ok = failed = 0
    worst = 0.0
    while not stop.is_set():
        t = time.perf_counter()
        try:
            r.hgetall("session:probe")
            ok += 1
        except redis.RedisError:
            failed += 1
            r.connection_pool.disconnect()
        worst = max(worst, time.perf_counter() - t)
    out.update(calls=ok + failed, failed=failed, worst_ms=round(worst * 1000, 1))


async def _backend() -> tuple[web.AppRunner, int]:
    async def handle(request: web.Request) -> web.Response:
        if request.path == "/login":
            return web.Response(headers={"X-Session-Login": f"user_id={UID}"})
        if request.path == "/bye":
            return web.Response(headers={"X-Session-Logout": "all"})
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def run(root: Path, members: int, real: int, timeout: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-logout-all-"))
    rport, gport = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    runner, bport = await _backend()
    ok = False
    try:
        procs.append(
            subprocess.Popen(
                ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(tmp)],
                stdout=subprocess.DEVNULL,
            )
        )  # fmt: skip
        cfg = {
            "listen": f"127.0.0.1:{gport}",
            "redis": {"url": f"redis://127.0.0.1:{rport}/0", "timeout": timeout},
            "session": {"cookie": {"name": "sid", "secure": False}},
            "upstreams": {"app": {"servers": [f"http://127.0.0.1:{bport}"]}},
            "routes": [
                {"path": "/login", "upstream": "app", "instructions": ["login"]},
                {"path": "/", "upstream": "app", "instructions": ["logout", "cart"]},
            ],
            "plugins": ["cart", "viewed_items"],
        }
        (tmp / "gw.yaml").write_text(yaml.safe_dump(cfg))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "gateway", "--config", str(tmp / "gw.yaml")],
                cwd=root,
                stdout=(tmp / "gw.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        rdb = redis.Redis(port=rport, decode_responses=True)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            for _ in range(200):
                try:
                    async with http.get(f"http://127.0.0.1:{gport}/"):
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            async with http.post(f"http://127.0.0.1:{gport}/login") as resp:
                token = resp.cookies["sid"].value
            pipe = rdb.pipeline(transaction=False)
            ids = [secrets.token_hex(32) for _ in range(members)]
            for i in range(0, members, 10_000):
                pipe.sadd(f"user_sessions:{UID}", *ids[i : i + 10_000])
            now = f"{time.time():.3f}"
            for _ in range(real):
                sid = secrets.token_hex(32)
                pipe.hset(f"session:{sid}", mapping={"user_id": UID, "login_time": now})
                pipe.expire(f"session:{sid}", 3600)
                pipe.hset(f"cart:{sid}", mapping={"item:a": "a|1|1.00", "total_items": "1"})
                pipe.sadd(f"user_sessions:{UID}", sid)
            pipe.execute()
            size = rdb.scard(f"user_sessions:{UID}")
            rdb.config_set("slowlog-log-slower-than", 10)
            rdb.config_set("slowlog-max-len", 100_000)
            rdb.slowlog_reset()
            rdb.config_resetstat()
            stop, probe = threading.Event(), dict[str, Any]()
            prober = threading.Thread(target=_probe, args=(rport, stop, probe))
            prober.start()
            await asyncio.sleep(0.5)
            began = time.perf_counter()
            async with http.get(
                f"http://127.0.0.1:{gport}/bye", headers={"Cookie": f"sid={token}"}
            ) as resp:
                status = resp.status
            wall = time.perf_counter() - began
            await asyncio.sleep(0.5)
            stop.set()
            prober.join()
        stats = rdb.info("commandstats")
        slow = rdb.slowlog_get(-1)
        longest = max(slow, key=lambda e: int(e["duration"])) if slow else None
        left = sum(1 for _ in rdb.scan_iter("session:*", count=1000)) - 1  # the probe's
        ok = True
        return {
            "root": str(root),
            "index_members": size,
            "status": status,
            "logout_wall_ms": round(wall * 1000, 1),
            "longest_command_us": longest["duration"] if longest else None,
            "longest_command": longest["command"].decode(errors="replace")[:80]
            if longest
            else None,
            # Redis time per command during the measurement (a script's own commands
            # counted again under their names), over 1 ms.
            "redis_usec": {k[8:]: v["usec"] for k, v in stats.items() if v["usec"] > 1000},
            "other_client": probe,
            "sessions_left": left,
            "index_left": rdb.exists(f"user_sessions:{UID}", f"user_sessions_ending:{UID}"),
            "carts_left": sum(1 for _ in rdb.scan_iter("cart:*", count=1000)),
        }
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait()
        await runner.cleanup()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=136_000)
    ap.add_argument("--real", type=int, default=100)
    ap.add_argument("--root", default=str(ROOT), help="checkout whose gateway runs")
    ap.add_argument("--timeout", type=float, default=2.0, help="redis.timeout of the gateway")
    a = ap.parse_args()
    res = asyncio.run(run(Path(a.root).resolve(), a.members, a.real, a.timeout))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
