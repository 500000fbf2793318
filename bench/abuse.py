"""What one abusive client does to a gateway: stalled uploads, and cookieless traffic on a
guest route. For the before/after of the hardening (issue 10) on any checkout.

`python -m bench.abuse [--root DIR] [--stalled 300] [--seconds 10] [--requests 2000]`

Starts a private redis-server, the fast backend and one gateway process (from `--root`,
another checkout), then:

1. *stall*: opens `--stalled` connections from 127.0.0.2 that each send `POST` with
   `Content-Length: 1000000` and ten bytes of body, then nothing. Meanwhile a normal
   client (127.0.0.1) sends GETs one after another for `--seconds`: prints how many were
   answered 200 and how many failed (by status), then waits `--grace` seconds more and
   prints how the stalled connections ended.
2. *guests*: sends `--requests` cookieless GETs to a `guest: true` route whose backend
   stores nothing (the bench backend answers every page 200), as a bot would: prints the
   session keys Redis holds afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import redis

from bench.gateway_proc import ROOT, gateway_config, start_gateway
from bench.procs import Children, Pinning, free_port, start_backend, start_redis


async def stalled_upload(port: int, outcomes: Counter[str], stop: asyncio.Event) -> None:
    try:
        # From another address than the normal client's (all of 127/8 is loopback): a
        # per-address limit must stop the attacker, not its victim.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=("127.0.0.2", 0)
        )
    except OSError:
        outcomes["connect failed"] += 1
        return
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: shop\r\nContent-Length: 1000000\r\n\r\n0123456789"
        )
        await writer.drain()
        read = asyncio.create_task(reader.read(200))
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({read, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if read in done:
            data = read.result()
            outcomes[data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"] += 1
        else:
            read.cancel()
            outcomes["still held at the end"] += 1
        waiter.cancel()
    except OSError as e:
        outcomes[type(e).__name__] += 1
    finally:
        writer.close()


async def normal_client(url: str, seconds: float) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    worst = 0.0
    end = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        while time.monotonic() < end:
            t = time.monotonic()
            try:
                async with s.get(url + "/page") as r:
                    await r.read()
                    statuses[str(r.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as e:
                statuses[type(e).__name__] += 1
            worst = max(worst, time.monotonic() - t)
    return {"statuses": dict(statuses), "slowest_s": round(worst, 2)}


def session_keys(port: int) -> int:
    r = redis.Redis(port=port)
    try:
        return sum(1 for _ in r.scan_iter("session:*", count=1000))
    finally:
        r.close()


async def run(a: argparse.Namespace) -> dict[str, Any]:
    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="abuse-"))
    pin = Pinning.choose(False)
    root = a.root or ROOT
    try:
        _, redis_port = start_redis(children, tmp, pin, "redis")
        _, backend_port = start_backend(children, tmp, pin)
        port = free_port()
        cfg = gateway_config(port, redis_port, backend_port)
        if "class LimitsSettings" not in (root / "gateway" / "config.py").read_text():
            cfg.pop("limits", None)  # a checkout from before the hardening
        else:
            cfg["limits"] = {}  # the defaults: this is about what they allow
        cfg["routes"][-1].update(guest=True, instructions=["set"])
        start_gateway(children, tmp, pin, "gateway", cfg, port, root=a.root)
        url = f"http://127.0.0.1:{port}"
        result: dict[str, Any] = {"root": str(root)}

        stop = asyncio.Event()
        outcomes: Counter[str] = Counter()
        uploads = []
        for i in range(a.stalled):
            uploads.append(asyncio.create_task(stalled_upload(port, outcomes, stop)))
            if i % 100 == 99:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        result["normal_during_stall"] = await normal_client(url, a.seconds)
        await asyncio.sleep(a.grace)
        stop.set()
        await asyncio.gather(*uploads)
        result["stalled_uploads"] = dict(outcomes.most_common())

        async with aiohttp.ClientSession() as s:
            for i in range(a.requests):
                async with s.get(f"{url}/page/{i}") as r:
                    await r.read()
                s.cookie_jar.clear()
        result["session_keys_after_bot"] = session_keys(redis_port)
        result["bot_requests"] = a.requests
        return result
    finally:
        children.stop_all()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__)
    ap.add_argument("--root", type=Path, default=None, help="checkout whose gateway to run")
    ap.add_argument("--stalled", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--grace", type=float, default=8.0, help="then wait for the stalled ones")
    ap.add_argument("--requests", type=int, default=2000)
    result = asyncio.run(run(ap.parse_args()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
