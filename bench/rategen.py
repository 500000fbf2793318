"""Open-loop constant-rate load generator (asyncio + aiohttp) for fixed-rate latency.

Request k is *scheduled* at t0 + k/rate and sent then whatever happened to earlier
requests (open loop); its latency is measured from the scheduled time, not from when it
was actually written, so a stall in the system under test shows up in the percentiles
instead of silently lowering the rate (no coordinated omission). The generator's own
lateness (dispatch - schedule) is reported too, so a saturated generator is visible.

Run as `python -m bench.rategen --url URL --rate R --duration S --cookies FILE`;
prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import aiohttp
import uvloop


def pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, round(p / 100 * len(sorted_vals)) - 1))
    return sorted_vals[i]


async def generate(
    url: str, rate: float, duration: float, cookies: list[str], conns: int, method: str
) -> dict[str, float | int]:
    # uvloop's loop.time() has millisecond resolution; latencies need microseconds.
    clock = time.perf_counter
    lat: list[float] = []
    dispatch_lag: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=conns, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), timeout=timeout
    ) as session:
        # Warm the connection pool so connection set-up isn't in the first percentiles.
        async def warm() -> None:
            async with session.request(method, url) as resp:
                await resp.read()

        await asyncio.gather(*(warm() for _ in range(min(conns, 8))), return_exceptions=True)

        async def one(scheduled: float, cookie: str) -> None:
            nonlocal errors
            dispatch_lag.append(clock() - scheduled)
            try:
                headers = {"Cookie": cookie} if cookie else {}
                async with session.request(method, url, headers=headers) as resp:
                    await resp.read()
                    if resp.status >= 400:
                        errors += 1
            except (aiohttp.ClientError, TimeoutError, OSError):
                errors += 1
            lat.append(clock() - scheduled)

        total = int(rate * duration)
        tasks: set[asyncio.Task[None]] = set()
        t0 = clock() + 0.05
        k = 0
        while k < total:
            now = clock()
            while k < total and t0 + k / rate <= now:
                t = asyncio.create_task(one(t0 + k / rate, cookies[k % len(cookies)]))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                k += 1
            wait = t0 + k / rate - clock()
            # Timers have ~1 ms resolution, so sends go out in 1 ms batches; spinning to
            # be more exact made the generator's own jitter worse, not better.
            await asyncio.sleep(max(0.0, wait))
        sent_done = clock()
        if tasks:
            await asyncio.wait(tasks, timeout=15)
    elapsed = sent_done - t0
    lat.sort()
    dispatch_lag.sort()
    ms = 1000.0
    return {
        "target_rate": rate,
        "requests": len(lat),
        "achieved_rate": round(len(lat) / elapsed, 1) if elapsed > 0 else 0.0,
        "errors": errors,
        "mean_ms": round(sum(lat) / len(lat) * ms, 3) if lat else 0.0,
        "p50_ms": round(pct(lat, 50) * ms, 3),
        "p95_ms": round(pct(lat, 95) * ms, 3),
        "p99_ms": round(pct(lat, 99) * ms, 3),
        "p999_ms": round(pct(lat, 99.9) * ms, 3),
        "max_ms": round(lat[-1] * ms, 3) if lat else 0.0,
        "gen_lag_p99_ms": round(pct(dispatch_lag, 99) * ms, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--cookies", type=Path)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--method", default="GET")
    a = ap.parse_args()
    cookies = [""]
    if a.cookies:
        cookies = [c for c in a.cookies.read_text().splitlines() if c] or [""]
    started = time.time()
    res = uvloop.run(generate(a.url, a.rate, a.duration, cookies, a.conns, a.method))
    res["wall_s"] = round(time.time() - started, 2)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
