"""``python -m gateway health --config FILE [--comprehensive] [--json]``: the case
study's ``health_check.py``, for scripts and the daily checklist.

One line per check, ``ok``, ``warn`` or ``fail``; the exit status is the worst of them
(0 ok, 1 warn, 2 fail: Nagios's convention, which monitoring agents read as is). A config
that does not load is one ``fail`` line with the ``--check`` error, and nothing else
runs.

Checked every time: the config; Redis reachability and round trip, a write within
``redis.timeout``, its role and replication, memory against ``maxmemory``, the eviction
policy (sessions all have TTLs, so any policy but ``noeviction`` may evict them once
``maxmemory`` is reached), persistence; the clock skew between this host and Redis;
every upstream server. ``--comprehensive`` adds Redis latency over many round trips
against the case study's 5 ms target, evictions and refused connections, client slots,
the age of the last save, a sample of session keys (TTLs) and user indexes (size), and
the running gateway's own ``/readyz`` and ``/metrics`` (error rate, p95) when
``admin.listen`` answers here. Under redis.sentinel the checks run on the master the
Sentinels name; the quorum itself is not checked.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from .config import ConfigError, Settings, split_host_port
from .configcheck import load_checked
from .errors import REDIS_FAILURES
from .readiness import probe_upstreams, redis_write
from .redis import Keys, RedisClient, close_client, make_client

Status = Literal["ok", "warn", "fail"]
SEVERITY: dict[Status, int] = {"ok": 0, "warn": 1, "fail": 2}

# The case study's targets and alert thresholds.
TARGET_P95_MS = 5.0
TARGET_ERROR_RATE = 0.001
MEMORY_WARN, MEMORY_FAIL = 0.80, 0.95
# Clock skew: sessions' idle expiry compares times written by different gateways and
# Redis's TTLs run on Redis's clock.
SKEW_WARN, SKEW_FAIL = 1.0, 30.0
REPLICA_LAG_WARN = 10  # seconds since a replica's last acknowledgement
BACKUP_AGE_WARN = 24 * 3600
CALL_LIMIT = 2.0  # seconds for one INFO or CONFIG call (a health check may run far away)
PINGS, LATENCY_PINGS = 5, 200
SAMPLE_SESSIONS, SAMPLE_USERS = 1000, 200


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.status:<4}  {self.name:<18} {self.detail}"

    def doc(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status, "detail": self.detail, **self.data}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _limited(aw: Awaitable[Any], limit: float = CALL_LIMIT) -> Any:
    async with asyncio.timeout(limit):
        return await aw


class RedisChecks:
    def __init__(self, settings: Settings, client: RedisClient) -> None:
        self.settings = settings
        self.client = client
        self.keys = Keys(settings.session.key_prefix, raw_tokens=settings.session.raw_token_keys)
        self.info: dict[str, Any] = {}
        self.rdb: bool | None = None  # RDB snapshots configured (None: CONFIG refused)

    async def reachable(self) -> Check:
        # The first round trip opens the connection: not a round trip to measure.
        await _limited(self.client.ping(), self.settings.redis.timeout)
        rtts = []
        for _ in range(PINGS):
            started = time.perf_counter()
            await _limited(self.client.ping(), self.settings.redis.timeout)
            rtts.append(time.perf_counter() - started)
        self.info = await _limited(self.client.info("all"))
        median, worst = statistics.median(rtts), max(rtts)
        version = self.info.get("redis_version", "?")
        detail = (
            f"Redis {version} answers: round trip {_ms(median)} ms median of {PINGS}, "
            f"{_ms(worst)} ms at most"
        )
        data = {"rtt_ms": _ms(median), "rtt_max_ms": _ms(worst), "version": version}
        if median * 1000 > TARGET_P95_MS or worst > self.settings.redis.timeout / 2:
            return Check(
                "redis",
                "warn",
                detail + f" (slow for redis.timeout "
                f"{self.settings.redis.timeout:g}s / the {TARGET_P95_MS:g} ms target)",
                data,
            )
        return Check("redis", "ok", detail, data)

    async def write(self) -> Check:
        limit = self.settings.redis.timeout
        probe = await redis_write(self.client, self.keys, limit)
        if not probe.ok:
            return Check("redis write", "fail", f"no write within {limit:g}s: {probe.error}")
        return Check(
            "redis write", "ok", f"a write took {probe.ms:.2f} ms", {"ms": round(probe.ms, 2)}
        )

    def role(self) -> Check:
        info = self.info
        role = info.get("role")
        if role != "master":
            link = info.get("master_link_status", "?")
            return Check(
                "redis role",
                "fail",
                f"{role}: the gateway writes sessions, a replica refuses them (master link "
                f"{link}); point redis.url at the primary",
                {"role": role},
            )
        replicas = []
        worst: Status = "ok"
        for i in range(int(info.get("connected_slaves", 0))):
            r = info.get(f"slave{i}")
            if not isinstance(r, dict):
                continue
            lag = int(r.get("lag", -1))
            state = r.get("state", "?")
            replicas.append(
                {"address": f"{r.get('ip')}:{r.get('port')}", "state": state, "lag": lag}
            )
            if state != "online" or lag > REPLICA_LAG_WARN:
                worst = "warn"
        if not replicas:
            return Check(
                "redis role",
                "warn",
                "primary without replicas: no copy to fail over to",
                {"role": role, "replicas": []},
            )
        text = ", ".join(f"{r['address']} {r['state']} lag {r['lag']}s" for r in replicas)
        return Check(
            "redis role",
            worst,
            f"primary, {len(replicas)} replicas: {text}",
            {"role": role, "replicas": replicas},
        )

    def memory(self) -> list[Check]:
        info = self.info
        used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        policy = str(info.get("maxmemory_policy", "?"))
        human = info.get("used_memory_human", f"{used} B")
        data = {"used_bytes": used, "maxmemory": limit, "policy": policy}
        if limit == 0:
            out = [
                Check(
                    "redis memory",
                    "warn",
                    f"{human} used, no maxmemory: Redis grows "
                    "until the host runs out (and the 80 % alert cannot fire)",
                    data,
                )
            ]
        else:
            share = used / limit
            status: Status = (
                "fail" if share >= MEMORY_FAIL else "warn" if share >= MEMORY_WARN else "ok"
            )
            out = [
                Check(
                    "redis memory",
                    status,
                    f"{human} used, {share:.0%} of maxmemory {info.get('maxmemory_human', limit)}",
                    {**data, "share": round(share, 4)},
                )
            ]
        if policy == "noeviction":
            out.append(
                Check(
                    "eviction policy",
                    "ok",
                    "noeviction: at maxmemory writes fail, no session is evicted",
                )
            )
        elif limit == 0:
            out.append(
                Check("eviction policy", "ok", f"{policy}, but no maxmemory: nothing is evicted")
            )
        else:
            which = "keys with a TTL" if policy.startswith("volatile-") else "any key"
            out.append(
                Check(
                    "eviction policy",
                    "warn",
                    f"{policy}: at maxmemory Redis evicts "
                    f"{which}, and every session has a TTL: sessions can vanish "
                    "(noeviction keeps them and fails writes instead)",
                )
            )
        return out

    async def persistence(self) -> Check:
        info = self.info
        if int(info.get("loading", 0)):
            return Check("persistence", "warn", "Redis is loading its data set")
        problems = []
        if info.get("rdb_last_bgsave_status") not in (None, "ok"):
            problems.append("the last RDB save failed")
        aof = int(info.get("aof_enabled", 0))
        if aof and info.get("aof_last_write_status") not in (None, "ok"):
            problems.append("the last AOF write failed")
        try:
            save = (await _limited(self.client.config_get("save"))).get("save", "")
        except REDIS_FAILURES:
            save = None  # CONFIG may be renamed away on managed Redis
        rdb = self.rdb = bool(save) if save is not None else None
        kinds = [k for k, on in (("AOF", aof), ("RDB snapshots", rdb)) if on]
        data = {"aof": bool(aof), "rdb": rdb}
        if problems:
            return Check("persistence", "fail", "; ".join(problems), data)
        if not kinds and rdb is False:
            return Check("persistence", "warn", "none: a Redis restart loses every session", data)
        return Check(
            "persistence",
            "ok",
            " and ".join(kinds) if kinds else "AOF off; RDB unknown (CONFIG not allowed)",
            data,
        )

    async def clock(self) -> Check:
        started = time.time()
        secs, micros = await _limited(self.client.time())
        ended = time.time()
        skew = (secs + micros / 1e6) - (started + ended) / 2
        status: Status = (
            "fail" if abs(skew) >= SKEW_FAIL else "warn" if abs(skew) >= SKEW_WARN else "ok"
        )
        return Check(
            "clock skew",
            status,
            f"Redis's clock is {skew * 1000:+.1f} ms from this "
            f"host's (round trip {_ms(ended - started)} ms)",
            {"skew_ms": round(skew * 1000, 1)},
        )

    # -- --comprehensive --------------------------------------------------------------

    async def latency(self) -> Check:
        rtts = []
        for _ in range(LATENCY_PINGS):
            started = time.perf_counter()
            await _limited(self.client.ping(), self.settings.redis.timeout)
            rtts.append(time.perf_counter() - started)
        p50, p95, p99 = (_ms(_pct(rtts, q)) for q in (0.5, 0.95, 0.99))
        status: Status = "warn" if p95 > TARGET_P95_MS else "ok"
        return Check(
            "redis latency",
            status,
            f"{LATENCY_PINGS} round trips: p50 {p50} ms, "
            f"p95 {p95} ms (target < {TARGET_P95_MS:g}), p99 {p99} ms",
            {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99},
        )

    def refusals(self) -> Check:
        evicted = int(self.info.get("evicted_keys", 0))
        rejected = int(self.info.get("rejected_connections", 0))
        status: Status = "warn" if evicted or rejected else "ok"
        return Check(
            "redis refusals",
            status,
            f"{evicted} keys evicted, {rejected} connections rejected since Redis started",
            {"evicted_keys": evicted, "rejected_connections": rejected},
        )

    def clients(self) -> Check:
        connected = int(self.info.get("connected_clients", 0))
        limit = int(self.info.get("maxclients", 0))
        share = connected / limit if limit else 0.0
        status: Status = "warn" if share >= 0.8 else "ok"
        return Check(
            "redis clients",
            status,
            f"{connected} connected of maxclients {limit}",
            {"connected": connected, "maxclients": limit},
        )

    def backups(self) -> Check:
        aof = int(self.info.get("aof_enabled", 0))
        if self.rdb is False and not aof:
            return Check("backups", "warn", "no RDB snapshots and no AOF: nothing to back up")
        age = time.time() - int(self.info.get("rdb_last_save_time", 0))
        changes = int(self.info.get("rdb_changes_since_last_save", 0))
        text = f"last RDB save {age / 3600:.1f} h ago, {changes} changes since"
        if aof:
            text += f"; AOF last rewrite {self.info.get('aof_last_bgrewrite_status', '?')}"
        stale = age > BACKUP_AGE_WARN and changes > 0 and not aof
        return Check("backups", "warn" if stale else "ok", text, {"last_save_age_s": round(age)})

    async def _sample(self, pattern: str, limit: int) -> list[str]:
        """Up to ``limit`` keys matching ``pattern`` (a bounded SCAN, never KEYS)."""
        found: list[str] = []
        cursor: Any = 0
        for _ in range(50):
            cursor, batch = await _limited(self.client.scan(cursor, match=pattern, count=1000))
            found.extend(batch)
            if int(cursor) == 0 or len(found) >= limit:
                break
        return found[:limit]

    async def sessions(self) -> Check:
        keys = await self._sample(f"{self.keys.session_prefix()}*", SAMPLE_SESSIONS)
        if not keys:
            return Check("sessions", "ok", "no session keys found (sampled by SCAN)")
        async with self.client.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.pttl(k)
            ttls = await _limited(pipe.execute())
        forever = sum(1 for t in ttls if t == -1)
        status: Status = "warn" if forever else "ok"
        return Check(
            "sessions",
            status,
            f"{len(keys)} session keys sampled, {forever} without a TTL",
            {"sampled": len(keys), "without_ttl": forever},
        )

    async def user_indexes(self) -> Check:
        pattern = self.keys.user_sessions("*").replace("{u:*}", "*")
        keys = await self._sample(pattern, SAMPLE_USERS)
        if not keys:
            return Check("user indexes", "ok", "no user_sessions sets found (sampled)")
        async with self.client.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.scard(k)
            sizes = await _limited(pipe.execute())
        cap = self.settings.session.max_per_user
        over = sum(1 for n in sizes if n > 2 * cap)
        status: Status = "warn" if over else "ok"
        return Check(
            "user indexes",
            status,
            f"{len(keys)} sampled, largest {max(sizes)} "
            f"ids, {over} over twice session.max_per_user ({cap})",
            {"sampled": len(keys), "largest": max(sizes), "over_cap": over},
        )


async def _guard(name: str, run: Callable[[], Awaitable[Any]]) -> list[Check]:
    """A check's lines; a failure to talk to Redis is that check's ``fail``."""
    try:
        got = await run()
    except (*REDIS_FAILURES, aiohttp.ClientError) as e:
        return [Check(name, "fail", f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)]
    return got if isinstance(got, list) else [got]


async def _upstreams(settings: Settings) -> list[Check]:
    servers = {n: list(u.servers) for n, u in settings.upstreams.items()}
    timeouts = {n: u.connect_timeout for n, u in settings.upstreams.items()}
    probes = await probe_upstreams(servers, timeouts)
    out = []
    for name, by_server in probes.items():
        up = [s for s, p in by_server.items() if p.ok]
        down = {s: p.error for s, p in by_server.items() if not p.ok}
        status: Status = "ok" if not down else "warn" if up else "fail"
        parts = [f"{s} {by_server[s].ms:.1f} ms" for s in up]
        parts += [f"{s} unreachable ({err})" for s, err in down.items()]
        out.append(
            Check(
                f"upstream {name}",
                status,
                "; ".join(parts),
                {"servers": {s: p.doc() for s, p in by_server.items()}},
            )
        )
    return out


async def _gateway(settings: Settings) -> list[Check]:
    """The running gateway on this host, through its admin listener."""
    if not settings.admin.listen:
        return [Check("gateway", "ok", "admin.listen not set: no running gateway to ask")]
    host, port = split_host_port(settings.admin.listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    base = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(f"{base}/readyz") as r:
                ready = r.status == 200
                doc = await r.json(loads=orjson.loads)
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        return [
            Check(
                "gateway",
                "warn",
                f"no gateway answers on {base} ({type(e).__name__}); not running on this host?",
            )
        ]
    out = [
        Check(
            "gateway ready",
            "ok" if ready else "fail",
            "ready" if ready else f"not ready: {', '.join(doc.get('failed', []))}",
        )
    ]
    total = errors = 0.0
    buckets: dict[float, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "gateway_requests_total":
                total += s.value
                if s.labels.get("status_class") == "5xx":
                    errors += s.value
            elif s.name == "gateway_request_seconds_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    if not total:
        out.append(Check("gateway traffic", "ok", "no requests answered yet"))
        return out
    rate = errors / total
    count = buckets.get(float("inf"), total)
    p95 = next((le for le, n in sorted(buckets.items()) if n >= 0.95 * count), float("inf"))
    slow = p95 * 1000 > TARGET_P95_MS
    status: Status = "warn" if rate > TARGET_ERROR_RATE or slow else "ok"
    out.append(
        Check(
            "gateway traffic",
            status,
            f"{int(total)} requests since start, "
            f"{rate:.3%} 5xx (target < {TARGET_ERROR_RATE:.1%}), p95 <= {p95 * 1000:g} "
            f"ms (target < {TARGET_P95_MS:g})",
            {"requests": int(total), "error_rate": round(rate, 6), "p95_le_ms": p95 * 1000},
        )
    )
    return out


async def run_checks(settings: Settings, comprehensive: bool) -> list[Check]:
    checks: list[Check] = []
    # Under redis.sentinel or redis.cluster, redis.url keeps its default ("embedded"):
    # only the url topology can be the embedded server.
    if settings.redis.topology == "url" and settings.redis.url == "embedded":
        checks.append(
            Check(
                "redis",
                "warn",
                "redis.url is embedded: the gateway starts a "
                "private Redis of its own, which only it can reach",
            )
        )
    else:
        client = make_client(settings.redis.url, settings.redis)
        try:
            rc = RedisChecks(settings, client)
            first = await _guard("redis", rc.reachable)
            checks += first
            if first[0].status != "fail":
                checks += await _guard("redis write", rc.write)
                checks += [rc.role(), *rc.memory()]
                checks += await _guard("persistence", rc.persistence)
                checks += await _guard("clock skew", rc.clock)
                if comprehensive:
                    checks += await _guard("redis latency", rc.latency)
                    checks += [rc.refusals(), rc.clients(), rc.backups()]
                    checks += await _guard("sessions", rc.sessions)
                    checks += await _guard("user indexes", rc.user_indexes)
        finally:
            await close_client(client)
    checks += await _upstreams(settings)
    if comprehensive:
        checks += await _gateway(settings)
    return checks


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway health", description=__doc__)
    ap.add_argument("--config", default="config.yaml", help="path to config.yaml")
    ap.add_argument("--comprehensive", action="store_true", help="the daily checklist's checks too")
    ap.add_argument("--json", action="store_true", help="one JSON document instead of lines")
    args = ap.parse_args(argv)
    try:
        settings, _ = load_checked(args.config)
    except ConfigError as e:
        checks = [Check("config", "fail", f"config error: {e}")]
    else:
        plugins = ", ".join(n for n, _ in settings.plugin_entries()) or "none"
        checks = [
            Check(
                "config",
                "ok",
                f"{args.config}: {len(settings.routes)} routes, "
                f"{len(settings.upstreams)} upstreams, plugins {plugins}",
            )
        ]
        checks += asyncio.run(run_checks(settings, args.comprehensive))
    worst = max(checks, key=lambda c: SEVERITY[c.status]).status
    if args.json:
        print(orjson.dumps({"status": worst, "checks": [c.doc() for c in checks]}).decode())
    else:
        for c in checks:
            print(c.line())
    return SEVERITY[worst]
