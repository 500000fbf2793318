"""Memory and service of a gateway process under a flood of never-ending request heads.

`python -m bench.header_flood [--root DIR] [--connections 1000] [--set KEY.PATH=YAML]`

Starts a private redis-server, the fast backend and one gateway process (from `--root`,
another checkout, for a before/after), then opens `--connections` connections that each
send a request line and header lines of ~16 KB (under max_request_header_size) without
the final CRLF, up to `--bytes` each or until the gateway answers or closes (with
`--sustain S`, each is replaced by a new one when cut, for S seconds). Meanwhile a
normal client sends one GET after another. Prints the gateway's RSS before, at its peak,
once every flood connection has finished sending and the gateway has read it all (the
connections still open), and 2 s and 10 s after they are all closed; how the flood
connections ended; and the normal requests answered.
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

from bench.cpu import apply_set
from bench.gateway_proc import gateway_config, start_gateway
from bench.procs import Children, Pinning, free_port, rss_kib, start_backend, start_redis

LINE_VALUE = 16_000


async def flood_one(port: int, limit: int, outcomes: Counter[str], sent: list[int]) -> None:
    """One flood connection: header lines until `limit` bytes or the gateway answers or
    closes; then hold it open until the gateway answers or closes it, or we are cancelled.
    Appends the bytes it sent to `sent` once it has stopped sending."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        outcomes[f"connect failed: {type(e).__name__}"] += 1
        sent.append(0)
        return
    total = 0
    stopped = False
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: flood\r\n")
        i = 0
        while total < limit and not (reader.at_eof() or writer.is_closing()):
            line = b"X-Fill-%04d: " % i + b"a" * LINE_VALUE + b"\r\n"
            writer.write(line)
            total += len(line)
            i += 1
            await writer.drain()
        sent.append(total)
        stopped = True
        answer = await reader.read(200)
        outcomes[answer.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"] += 1
    except (ConnectionError, OSError) as e:
        outcomes[f"reset: {type(e).__name__}"] += 1
    except asyncio.CancelledError:
        outcomes["held open until closed by the client"] += 1
        raise
    finally:
        if not stopped:
            sent.append(total)
        writer.close()


async def normal_client(url: str, stop: asyncio.Event, out: dict[str, Any]) -> None:
    """One GET after another on a fresh connection each (as a new visitor would)."""
    ok = failed = 0
    latencies: list[float] = []
    timeout = aiohttp.ClientTimeout(total=5)
    while not stop.is_set():
        started = time.monotonic()
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as s,
                s.get(url + "/nosession/x") as r,
            ):
                await r.read()
                if r.status == 200:
                    ok += 1
                    latencies.append(time.monotonic() - started)
                else:
                    failed += 1
        except (aiohttp.ClientError, TimeoutError):
            failed += 1
        await asyncio.sleep(0.02)
    latencies.sort()
    out.update(
        ok=ok,
        failed=failed,
        p50_ms=round(latencies[len(latencies) // 2] * 1000, 1) if latencies else None,
        max_ms=round(latencies[-1] * 1000, 1) if latencies else None,
    )


async def flood_worker(
    port: int, limit: int, outcomes: Counter[str], sent: list[int], until: float
) -> None:
    """flood_one, and again on a new connection while the gateway cuts them, until
    ``until`` (a sustained attack; the first round is the whole flood without it)."""
    while True:
        await flood_one(port, limit, outcomes, sent)
        if time.monotonic() >= until:
            return


def mib(pid: int) -> float:
    return round(rss_kib(pid) / 1024, 1)


async def run(a: argparse.Namespace) -> dict[str, Any]:
    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="header-flood-"))
    pin = Pinning.choose(False)
    try:
        _, redis_port = start_redis(children, tmp, pin, "redis")
        _, backend_port = start_backend(children, tmp, pin)
        port = free_port()
        cfg = gateway_config(port, redis_port, backend_port)
        for s in a.set:
            apply_set(cfg, s)
        gw = start_gateway(children, tmp, pin, "gateway", cfg, port, root=a.root)
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:
            for _ in range(50):
                async with s.get(url + "/nosession/warm") as r:
                    await r.read()
        result: dict[str, Any] = {"root": str(a.root or "."), "set": a.set}
        result["rss_before_mib"] = mib(gw.pid)
        peak = 0.0

        async def sample(stop: asyncio.Event) -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, mib(gw.pid))
                await asyncio.sleep(0.1)

        outcomes: Counter[str] = Counter()
        sent: list[int] = []
        stop = asyncio.Event()
        normal: dict[str, Any] = {}
        sampler = asyncio.create_task(sample(stop))
        client = asyncio.create_task(normal_client(url, stop, normal))
        started = time.monotonic()
        floods = []
        until = started + a.sustain
        for i in range(a.connections):
            floods.append(asyncio.create_task(flood_worker(port, a.bytes, outcomes, sent, until)))
            if i % 100 == 99:
                await asyncio.sleep(0.05)  # stay under the listen backlog
        # The flood is "sent" once every connection stopped sending (all it could, or
        # answered or cut by the gateway); those the gateway holds stay open until below.
        deadline = started + a.max_seconds
        while (
            len(sent) < a.connections or time.monotonic() < until
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        result["flood_seconds"] = round(time.monotonic() - started, 1)
        # What the clients wrote may still sit in socket buffers: the gateway has taken
        # it all once every flood connection was answered or closed, or its RSS stopped
        # moving with none answered for a second (it holds the rest).
        last, answered = mib(gw.pid), sum(outcomes.values())
        while time.monotonic() < deadline and not all(f.done() for f in floods):
            await asyncio.sleep(1)
            now, now_answered = mib(gw.pid), sum(outcomes.values())
            if abs(now - last) < 1 and now_answered == answered:
                break
            last, answered = now, now_answered
        result["settled_seconds"] = round(time.monotonic() - started, 1)
        result["rss_flood_held_mib"] = mib(gw.pid)
        stop.set()
        await client
        for f in floods:
            f.cancel()
        await asyncio.gather(*floods, return_exceptions=True)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        result["rss_peak_mib"] = max(peak, result["rss_flood_held_mib"])
        await asyncio.sleep(2)
        result["rss_closed_2s_mib"] = mib(gw.pid)
        await asyncio.sleep(8)
        result["rss_closed_10s_mib"] = mib(gw.pid)
        result["flood_connections"] = len(sent)
        result["flood_outcomes"] = dict(outcomes.most_common())
        result["flood_bytes_sent_mean"] = int(sum(sent) / max(1, len(sent)))
        result["normal_requests_during_flood"] = normal
        async with aiohttp.ClientSession() as s, s.get(url + "/nosession/after") as r:
            result["after_status"] = r.status
        return result
    finally:
        children.stop_all()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.header_flood", description=__doc__)
    ap.add_argument("--root", type=Path, default=None, help="checkout whose gateway to run")
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--bytes", type=int, default=2_000_000, help="header bytes per connection")
    ap.add_argument(
        "--sustain",
        type=float,
        default=0.0,
        help="seconds each flood connection is replaced by a new one when cut",
    )
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY.PATH=YAML")
    result = asyncio.run(run(ap.parse_args()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
