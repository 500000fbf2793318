"""Migration from sessions kept in the legacy app's database (the case study's roadmap:
read-through, rollout, rollback window, cut-over).

- **Read-through**: a visitor carrying the legacy app's session cookie and no gateway
  session has the legacy row read (a configured read-only query; columns mapped to
  fields) and gets a gateway session from it: a new token, the cookie set, Redis from
  then on. At most one read per legacy session across every process
  (plugins/legacy/reads.py); database down → the source is skipped and counted.
- **Rollout**: ``rollout_percent`` of visitors, by a stable hash of their legacy cookie
  (plugins/legacy/rollout.py), get the gateway's sessions; the others are bypassed
  (``bypass_sessions``): the legacy app keeps their sessions, untouched. The percentage
  is read on every request from the options, so a reload that rebuilds the chain moves
  it without a restart; ``gateway_legacy_sessions_rollout_percent`` shows it.
- **Rollback window** (``rollback:``): logins and logouts made through the gateway are
  also written to the legacy table, behind and batched (plugins/legacy/writeback.py); a
  login gets a new legacy cookie in the visitor's own rollout bucket. Activity never
  goes to the database.
- **Cut-over report**: ``python -m gateway migrate status`` (``migration_status``), from
  counters every process adds to Redis each minute (plugins/legacy/stats.py).

Redis keys: ``legacy:sid:<sha256(legacy token)>`` (the read's outcome), ``legacy:{<id>}``
per gateway session that came from (or went to) the legacy table (the digest, and with
``rollback`` the legacy token itself, which a logout must delete: the rollback window is
the one time a live legacy token is kept in Redis), ``legacy:stats:*``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, cast

from prometheus_client import Counter, Gauge

from gateway.errors import REDIS_FAILURES
from gateway.headers import parse_cookie_values
from gateway.plugin import Plugin, RequestContext, ResponseHead, Services
from gateway.sessions import Session
from gateway.sessions.cookies import cookie_attributes, expired_cookie

from .legacy import stats
from .legacy.config import LegacySessionsConfig
from .legacy.database import DATABASE_FAILURES, LegacyDatabase, open_legacy_database
from .legacy.reads import LegacyReads, digest
from .legacy.rollout import BUCKETS, bucket, chosen, random_bucket, token_in_bucket
from .legacy.writeback import Kind, WriteBehind

log = logging.getLogger("plugins.legacy_sessions")

LOOKUPS = Counter(
    "gateway_legacy_sessions_lookups_total",
    "Legacy session lookups by outcome (imported, shared, not-found, guest, negative, "
    "cached, already-imported, joined, busy, throttled, db-error, db-down, redis-error)",
    ["outcome"],
)
READS = Counter("gateway_legacy_sessions_db_reads_total", "Queries sent to the legacy database")
WRITES = Counter(
    "gateway_legacy_sessions_writes_total",
    "Rollback writes to the legacy table (rows) by outcome: written, failed, dropped",
    ["kind", "outcome"],
)
REQUESTS = Counter(
    "gateway_legacy_sessions_requests_total",
    "Requests on session routes by the source of their session: gateway (its own), "
    "legacy (imported by this request), pass-through (bypassed by the rollout), none",
    ["source"],
)
# labels() hashes and locks on every call; these run on every request.
_BY_SOURCE = {s: REQUESTS.labels(s) for s in stats.SOURCES}
ROLLOUT = Gauge(
    "gateway_legacy_sessions_rollout_percent",
    "Percentage of visitors whose sessions the gateway keeps",
)

STATS_INTERVAL = 5.0
SHUTDOWN_WRITES = 5.0


@dataclass(slots=True)
class _Request:
    """Per request (ctx.state[name]): the legacy token, read once."""

    token: str | None
    imported: str | None = None  # the digest of the legacy session this request imported


class LegacySessions(Plugin):
    name = "legacy_sessions"
    Config = LegacySessionsConfig
    fault_policy = "open"

    config: LegacySessionsConfig

    def __init__(self, config: LegacySessionsConfig, services: Services) -> None:
        super().__init__(config, services)
        c = config.cookie
        self._pattern = re.compile(c.pattern)
        self._gateway_cookie = services.settings.session.cookie.name
        self._cookie_tail = cookie_attributes(c.path, c.domain, c.http_only, c.secure, c.same_site)
        self._expired = expired_cookie(c.name, self._cookie_tail)
        self._session_ttl = services.settings.session.absolute_ttl
        self._tasks: list[asyncio.Task[None]] = []
        self.db: LegacyDatabase | None = None
        self.writes: WriteBehind | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def startup(self) -> None:
        cfg, svc = self.config, self.services
        self.db = open_legacy_database(cfg.dsn, cfg.pool_size, cfg.timeout)
        self.stats = stats.MigrationStats(svc.redis, svc.keys, svc.redis_timeout)
        self.reads = LegacyReads(cfg, self.db, svc.redis, svc.keys, svc.redis_timeout, self._read)
        if cfg.rollback is not None:
            self.writes = WriteBehind(self.db, cfg.rollback, cfg.timeout, self._written)
            self.writes.start()
        self._tasks.append(asyncio.create_task(self.stats.run(STATS_INTERVAL)))
        ROLLOUT.set(cfg.rollout_percent)

    async def shutdown(self) -> None:
        if self.writes is not None:
            await self.writes.stop(SHUTDOWN_WRITES)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.stats.flush()
        if self.db is not None:
            await self.db.close()

    def _read(self) -> None:
        READS.inc()
        self.stats.add("reads")

    def _written(self, kind: Kind, outcome: str, n: int) -> None:
        WRITES.labels(kind, outcome).inc(n)
        if outcome == "written":
            self.stats.add("writes", n)

    # -- one request ----------------------------------------------------------------------

    def _state(self, ctx: RequestContext) -> _Request:
        st = ctx.state.get(self.name)
        if not isinstance(st, _Request):
            values = parse_cookie_values(
                ctx.request.headers.getall("Cookie", ()), self.config.cookie.name
            )
            # Two values (one planted on a parent domain, say) name no session.
            token = values[0] if len(values) == 1 and self._pattern.fullmatch(values[0]) else None
            st = ctx.state[self.name] = _Request(token)
        return st

    def bypass_sessions(self, ctx: RequestContext) -> bool:
        percent = self.config.rollout_percent
        if percent >= 100:
            return False
        if percent <= 0:
            return True
        token = self._state(ctx).token
        if token is not None:
            return not chosen(token, percent)
        # No legacy session: one the gateway holds a session for stays with it (the
        # legacy app does not know the visitor); a new visitor goes to the legacy app,
        # whose cookie then decides.
        return not parse_cookie_values(
            ctx.request.headers.getall("Cookie", ()), self._gateway_cookie
        )

    async def find_session(self, ctx: RequestContext) -> dict[str, str] | None:
        st = self._state(ctx)
        if st.token is None:
            return None
        fields, outcome = await self.reads.lookup(st.token)
        LOOKUPS.labels(outcome).inc()
        if fields is None:
            return None
        st.imported = digest(st.token)
        if self.config.cookie.on_import == "expire":
            ctx.cookies.append(self._expired)
        return fields

    async def request(self, ctx: RequestContext) -> None:
        if ctx.route.session == "none":
            return
        st = ctx.state.get(self.name)
        imported = st.imported if isinstance(st, _Request) else None
        if ctx.sessions_bypassed:
            source = "pass-through"
        elif imported is not None and ctx.session is not None:
            source = "legacy"
            token = st.token if isinstance(st, _Request) else None
            await self._link(ctx.session, imported, token)
        elif ctx.session is not None:
            source = "gateway"
        else:
            source = "none"
        _BY_SOURCE[source].inc()
        self.stats.add(f"source:{source}")
        if source == "legacy":
            self.stats.add("imported")

    async def _link(self, session: Session, h: str, token: str | None) -> None:
        """Remember which legacy session a gateway session stands for: its end then ends
        the legacy one too (never imported again; deleted in the rollback window)."""
        mapping = {"h": h}
        # SECURITY: the raw legacy token is kept only in the rollback window, where a
        # logout must delete its row; it lives as long as the gateway session.
        if token is not None and self.config.rollback is not None:
            mapping["token"] = token
        key = self.services.keys.of("legacy", session.key_id)
        try:
            async with asyncio.timeout(self.services.redis_timeout):
                pipe = self.services.redis.pipeline(transaction=False)
                pipe.hset(key, mapping=cast(Any, mapping))
                pipe.expire(key, self._session_ttl)
                await pipe.execute()
        except REDIS_FAILURES as e:
            log.warning("legacy_sessions: link not stored, redis failed: %s", e)

    async def _unlink(self, key_ids: list[str]) -> list[dict[str, str]]:
        keys = [self.services.keys.of("legacy", k) for k in key_ids]
        async with asyncio.timeout(self.services.redis_timeout):
            pipe = self.services.redis.pipeline(transaction=False)
            for k in keys:
                pipe.hgetall(k)
            pipe.delete(*keys)
            got = await pipe.execute()
        return [dict(h) for h in got[:-1] if h]

    async def response(self, ctx: RequestContext, head: ResponseHead) -> None:
        """A login through the gateway in the rollback window: a legacy session for it
        too, with its cookie, so that turning the gateway's sessions off keeps the user
        logged in. The legacy session the visitor had (if any) ends, as a legacy login
        would end it."""
        new = ctx.session
        if self.writes is None or not ctx.logged_in or new is None:
            return
        old_token = self._state(ctx).token
        ended = {old_token} if old_token is not None else set()
        if ctx.rotated_from is not None:
            with contextlib.suppress(*REDIS_FAILURES):
                for link in await self._unlink([ctx.rotated_from.key_id]):
                    if "token" in link:
                        ended.add(link["token"])
        percent = self.config.rollout_percent
        # The visitor keeps their side of the rollout (see rollout.token_in_bucket).
        target = (
            bucket(old_token)
            if old_token is not None
            else random_bucket(percent if percent < 100 else BUCKETS)
        )
        token = token_in_bucket(target, self.config.cookie.token_bytes)
        now = time.time()
        for t in ended:
            self.writes.add("logout", {"token": t, "now": now})
        self.writes.add("login", {**new.fields, "token": token, "now": now})
        h = digest(token)
        await self._link(new, h, token)
        try:
            await self.reads.mark([h], "done")
        except REDIS_FAILURES as e:
            log.warning("legacy_sessions: redis failed: %s", e)
        head.headers.add("Set-Cookie", f"{self.config.cookie.name}={token}; {self._cookie_tail}")

    # -- sessions, with or without a request ------------------------------------------------

    async def sessions_deleted(self, key_ids: list[str]) -> None:
        """Gateway sessions that stood for legacy ones ended: those are never imported
        again, and in the rollback window their rows are deleted too."""
        try:
            links = await self._unlink(key_ids)
            await self.reads.mark([link["h"] for link in links if "h" in link], "ended")
        except REDIS_FAILURES as e:
            log.warning("legacy_sessions: ended sessions not followed, redis failed: %s", e)
            return
        if self.writes is not None:
            now = time.time()
            for link in links:
                if "token" in link:
                    self.writes.add("logout", {"token": link["token"], "now": now})

    # -- the cut-over report ----------------------------------------------------------------

    async def migration_status(self) -> list[tuple[str, str]]:
        cfg, svc = self.config, self.services
        rows: list[tuple[str, str]] = [
            ("rollout", f"{cfg.rollout_percent} % of visitors on the gateway's sessions"),
            (
                "rollback window",
                "on (logins and logouts written to the legacy table)" if cfg.rollback else "off",
            ),
        ]
        try:
            minutes, totals = await stats.last_hour(
                svc.redis, svc.keys, time.time(), svc.redis_timeout
            )
        except REDIS_FAILURES as e:
            rows.append(("counters", f"unavailable: redis failed: {type(e).__name__}: {e}"))
        else:
            rows.append(("sessions imported", str(totals.get("imported", 0))))
            rows += _per_minute(minutes)
        rows.append(("legacy sessions still active", await self._active()))
        return rows

    async def _active(self) -> str:
        q = self.config.active_query
        if q is None:
            return "unknown (set active_query)"
        db = open_legacy_database(self.config.dsn, 1, self.config.timeout)
        values = {"token": "", "now": time.time()}
        try:
            async with asyncio.timeout(self.config.timeout * 5):
                n = await db.fetch_value(q.sql, [values[p] for p in q.params])
        except DATABASE_FAILURES as e:
            return f"unavailable: database failed: {type(e).__name__}: {e}"
        finally:
            await db.close()
        return str(n)


def _per_minute(minutes: list[dict[str, int]]) -> list[tuple[str, str]]:
    """Reads and writes per minute over the last hour, and the share of requests by
    session source."""

    def rate(name: str) -> str:
        series = [m.get(name, 0) for m in minutes]
        recent = " ".join(str(v) for v in series[-10:])
        return (
            f"avg {sum(series) / len(series):.1f}, peak {max(series)}, "
            f"last 10 minutes (oldest first): {recent}"
        )

    rows = [
        ("database reads per minute (last hour)", rate("reads")),
        ("database writes per minute (last hour)", rate("writes")),
    ]
    counts = {s: sum(m.get(f"source:{s}", 0) for m in minutes) for s in stats.SOURCES}
    total = sum(counts.values())
    share = (
        ", ".join(f"{s} {100 * n / total:.1f} %" for s, n in counts.items())
        if total
        else "no requests counted"
    )
    rows.append((f"requests by session source (last hour, {total})", share))
    return rows
