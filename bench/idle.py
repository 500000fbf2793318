"""Idle keep-alive connections: one gateway process's RSS with N client connections open.

Each connection makes one session request (HTTP/1.1 keep-alive, a cookie from the
scenario's cookie file, so the near-cache holds those sessions as it would in a shop)
and then stays open and silent — a visitor reading a page. With all of them open the
gateway's RSS is sampled and a new connection must still get 200 for a session request.

All benchmark clients are on the loopback: the connections are spread over source
addresses 127.0.0.2, 127.0.0.3, … (`PER_ADDRESS` each) so the gateway's per-address
cap (`limits.connections_per_address`, 256) stays in force as it would with real
visitors. Everything must happen inside the gateway's `limits.keepalive_timeout` (30 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.procs import rss_kib

PER_ADDRESS = 200


def raise_fd_limit(need: int) -> None:
    # The harness holds one socket per idle connection: lift the soft limit to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _open_one(
    host: str, port: int, src: str, request: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await asyncio.open_connection(host, port, local_addr=(src, 0))
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return reader, writer, status


async def idle_connections(
    host: str, port: int, path: str, cookie_file: Path, n: int, pid: int
) -> dict[str, Any]:
    """Open `n` keep-alive connections (one request each), then measure and probe."""
    raise_fd_limit(n)
    cookies = [c for c in cookie_file.read_text().splitlines() if c]
    rss_before = rss_kib(pid)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    statuses: dict[int, int] = {}
    failures: list[str] = []
    sem = asyncio.Semaphore(128)

    async def one(i: int) -> None:
        src = f"127.0.0.{2 + i // PER_ADDRESS}"
        req = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Cookie: {cookies[i % len(cookies)]}\r\n\r\n").encode()  # fmt: skip
        async with sem:
            try:
                reader, writer, status = await asyncio.wait_for(
                    _open_one(host, port, src, req), 20
                )
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as e:
                if len(failures) < 3:
                    failures.append(repr(e))
                statuses[-1] = statuses.get(-1, 0) + 1
                return
        statuses[status] = statuses.get(status, 0) + 1
        conns.append((reader, writer))

    started = time.monotonic()
    try:
        await asyncio.gather(*(one(i) for i in range(n)))
        open_s = time.monotonic() - started
        await asyncio.sleep(1.0)  # let the gateway settle after the burst
        rss_open = rss_kib(pid)
        # A new visitor while they are all open.
        timeout = aiohttp.ClientTimeout(total=10)
        try:
            async with (
                aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                      timeout=timeout) as http,  # fmt: skip
                http.get(f"http://{host}:{port}{path}", headers={"Cookie": cookies[0]}) as resp,
            ):
                await resp.read()
                probe: int | str = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            probe = repr(e)
        # Still open = the gateway has not closed them (no EOF waiting to be read).
        still_open = sum(1 for r, _ in conns if not r.at_eof())
        elapsed = time.monotonic() - started
    finally:
        for _, w in conns:
            with contextlib.suppress(Exception):
                w.close()
    return {
        "connections": n,
        "answered_200": statuses.get(200, 0),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failures": failures,
        "still_open": still_open,
        "open_s": round(open_s, 1),
        "elapsed_s": round(elapsed, 1),
        "rss_before_mib": round(rss_before / 1024, 1),
        "rss_mib": round(rss_open / 1024, 1),
        "probe_status": probe,
        "distinct_sessions": min(n, len(cookies)),
    }
