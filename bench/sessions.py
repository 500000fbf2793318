"""Sessions for the load: created through the gateway's login path, or seeded directly
in the gateway's Redis layout for the naive proxy; Redis counters; memory per session."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench.procs import HarnessError, log

CASE_STUDY_FIELDS = (
    "user_id", "username", "email", "login_time", "last_activity", "current_page", "page_views",
)  # fmt: skip


def session_key(token: str) -> str:
    # DESIGN.md: session:<sha256 hex of the cookie token>.
    return "session:" + hashlib.sha256(token.encode()).hexdigest()


def session_fields(i: int) -> dict[str, str]:
    """The case study's seven fields with realistic values (its own example's shapes)."""
    now = time.time()
    return {
        "user_id": str(10000 + i),
        "username": f"user_{i}",
        "email": f"user_{i}@example.com",
        "login_time": f"{now:.3f}",
        "last_activity": f"{now:.3f}",
        "current_page": "/products/laptop-123",
        "page_views": "15",
    }


async def login_sessions(base_url: str, n: int, path: str = "/login") -> list[str]:
    """POST {path}?user=i through the gateway n times; return `sid=<token>` values."""
    cookies: list[str] = []
    failures: list[str] = []
    sem = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:

        async def one(i: int) -> None:
            async with sem, http.post(f"{base_url}{path}?user={i + 1}") as resp:
                await resp.read()
                morsel = resp.cookies.get("sid")
                if resp.status < 400 and morsel is not None and morsel.value:
                    cookies.append(f"sid={morsel.value}")
                elif len(failures) < 3:
                    failures.append(f"status {resp.status}, Set-Cookie {resp.cookies!r}")

        await asyncio.gather(*(one(i) for i in range(n)))
    if not cookies:
        raise HarnessError(f"login through the gateway gave no sid cookie: {failures}")
    if len(cookies) < n:
        log(f"warning: {n - len(cookies)} of {n} logins gave no cookie: {failures}")
    return cookies


async def seed_sessions(redis_url: str, n: int, ttl: int = 3600) -> list[str]:
    """Create n sessions directly in Redis (gateway layout); return `sid=<token>` values."""
    r = aioredis.Redis.from_url(redis_url)
    tokens = [secrets.token_urlsafe(32) for _ in range(n)]
    try:
        # Pipelines of 2,000 sessions: 100,000 in one would hold every reply in memory.
        for start in range(0, n, 2000):
            pipe = r.pipeline(transaction=False)
            for i in range(start, min(n, start + 2000)):
                key = session_key(tokens[i])
                pipe.hset(key, mapping=session_fields(i))
                pipe.expire(key, ttl)
            await pipe.execute()
    finally:
        await r.aclose()
    return [f"sid={t}" for t in tokens]


def write_cookie_file(path: Path, cookies: list[str]) -> Path:
    path.write_text("\n".join(cookies) + "\n")
    return path


# Commands the gateway sends at top level during a measured run: one HGETALL per session
# lookup that misses the near-cache (pipelined in batches, each still its own command),
# one EVALSHA per write-behind batch, and one PING after each EVALSHA on the near-cache
# link (it ends the window of the script's own invalidations), plus the link's heartbeat
# PING when it is idle. None is ever called from inside a script, so their commandstats
# calls are exactly the commands the gateway sent. Everything else that Redis counts
# while the gateway runs (SET NX once per batch; EXPIRE, HSET, HINCRBY per flushed
# session) is executed inside the activity script.
GATEWAY_TOP_LEVEL = ("hgetall", "evalsha", "ping")


@dataclass
class RedisDelta:
    """What Redis did between two snapshots, without our own INFO calls."""

    executed: int  # total_commands_processed delta: counts commands run inside scripts
    by_cmd: dict[str, int]  # commandstats calls delta, per command (also in-script ones)

    def sent(self, top_level: tuple[str, ...] | None) -> int:
        """Commands a client sent: the given top-level commands' calls, or (None) every
        command, for a client that uses no scripts (then sent == executed)."""
        if top_level is None:
            return sum(self.by_cmd.values())
        return sum(self.by_cmd.get(c, 0) for c in top_level)


class RedisCounter:
    """total_commands_processed and per-command calls, before/after a measurement."""

    def __init__(self, url: str) -> None:
        self.r = aioredis.Redis.from_url(url)
        self.before_total = 0
        self.before_cmds: dict[str, int] = {}

    async def _read(self) -> tuple[int, dict[str, int]]:
        stats = await self.r.info("stats")
        cmds = await self.r.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in cmds.items()}
        return int(stats["total_commands_processed"]), calls

    async def start(self) -> None:
        self.before_total, self.before_cmds = await self._read()

    async def settle(self, max_wait: float = 5.0) -> None:
        """Wait until Redis sees no more commands, so write-behind flushes are counted."""
        def busy(cmds: dict[str, int]) -> int:
            # Our INFO calls, and the near-cache link's idle heartbeat PING, never stop.
            return sum(v for k, v in cmds.items() if k not in ("info", "ping"))

        _, cmds = await self._read()
        last = busy(cmds)
        deadline = time.monotonic() + max_wait
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            _, cmds = await self._read()
            if busy(cmds) == last:
                return
            last = busy(cmds)

    async def stop(self) -> RedisDelta:
        total, cmds = await self._read()
        delta = {
            k: v - self.before_cmds.get(k, 0)
            for k, v in cmds.items()
            if v - self.before_cmds.get(k, 0) > 0
        }
        # Our own INFO calls are commands too; leave them out of the system's count. Each
        # snapshot reads INFO stats then INFO commandstats, and neither counts itself, so
        # both deltas cover the same number of INFO calls.
        ours = delta.pop("info", 0)
        return RedisDelta(total - self.before_total - ours, delta)

    async def close(self) -> None:
        await self.r.aclose()


async def scrape_gateway_commands(admin_url: str) -> dict[str, float]:
    """gateway_redis_commands_total per op from the gateway's admin /metrics."""
    out: dict[str, float] = {}
    async with (
        aiohttp.ClientSession() as http,
        http.get(admin_url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("gateway_redis_commands_total{"):
            labels, _, value = line.rpartition(" ")
            op = labels.split('op="', 1)[1].split('"', 1)[0]
            out[op] = out.get(op, 0.0) + float(value)
    return out


async def memory_per_session(redis_url: str, n: int) -> dict[str, Any]:
    """used_memory delta of n seven-field session hashes with TTL, in a fresh Redis.

    Sessions are written with pipelined HSET + EXPIRE exactly in the gateway's layout
    (session:<sha256 hex>); a second figure adds the user_sessions:<user_id> index set.
    """
    r = aioredis.Redis.from_url(redis_url)
    try:
        await r.flushall()
        await asyncio.sleep(0.2)
        before = int((await r.info("memory"))["used_memory"])
        tokens = [secrets.token_urlsafe(32) for _ in range(n)]
        for start in range(0, n, 2000):
            pipe = r.pipeline(transaction=False)
            for i in range(start, min(n, start + 2000)):
                key = session_key(tokens[i])
                pipe.hset(key, mapping=session_fields(i))
                pipe.expire(key, 3600)
            await pipe.execute()
        after = int((await r.info("memory"))["used_memory"])
        sample = session_key(tokens[0])
        encoding = (await r.object("encoding", sample)) or b"?"
        usage = await r.memory_usage(sample)
        for start in range(0, n, 2000):
            pipe = r.pipeline(transaction=False)
            for i in range(start, min(n, start + 2000)):
                pipe.sadd(f"user_sessions:{10000 + i}", session_key(tokens[i])[8:])
                pipe.expire(f"user_sessions:{10000 + i}", 28800)
            await pipe.execute()
        with_index = int((await r.info("memory"))["used_memory"])
        version = (await r.info("server"))["redis_version"]
    finally:
        await r.aclose()
    enc = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
    return {
        "sessions": n,
        "bytes_per_session": round((after - before) / n, 1),
        "bytes_per_session_with_user_index": round((with_index - before) / n, 1),
        "encoding": enc,
        "memory_usage_one_key": usage,
        "redis_version": version,
    }


async def inspect_gateway_sessions(redis_url: str, sample: int = 50) -> dict[str, Any]:
    """What the real gateway stored: fields, encoding and MEMORY USAGE of a sample."""
    r = aioredis.Redis.from_url(redis_url)
    try:
        keys = []
        async for k in r.scan_iter(match="session:*", count=500):
            keys.append(k)
            if len(keys) >= sample:
                break
        if not keys:
            return {"sessions_found": 0}
        encodings: dict[str, int] = {}
        usage = 0
        for k in keys:
            enc = await r.object("encoding", k)
            name = enc.decode() if isinstance(enc, bytes) else str(enc)
            encodings[name] = encodings.get(name, 0) + 1
            usage += int(await r.memory_usage(k) or 0)
        fields = sorted(f.decode() for f in (await r.hgetall(keys[0])))
        ttl = await r.ttl(keys[0])
        total_keys = int(await r.dbsize())
    finally:
        await r.aclose()
    return {
        "sessions_found": len(keys),
        "fields": fields,
        "encodings": encodings,
        "avg_memory_usage_bytes": round(usage / len(keys), 1),
        "ttl_s": ttl,
        "dbsize": total_keys,
    }
