"""A shared page cache in Redis for GET/HEAD on configured path prefixes.

Hit: the request hook answers from Redis (status, headers, body as the backend sent
them, minus Set-Cookie and per-request headers) with ``X-Cache: HIT`` and ``Age``.

Miss: the request goes upstream through the core as usual (header rules, instructions,
cookies all apply). The response hook decides whether the answer may be stored and, if
so, sets ``ctx.body_tap`` to collect the body as the core streams it to the client; the
entry is written to Redis once the body is complete. Concurrent misses of one key are
collapsed: the first becomes the leader, the others wait (``wait_timeout``) for the
leader's body in memory and answer from it as hits, or go upstream themselves when the
leader's answer could not be stored.

Keys: ``pagecache:<sha256(GET|host|path?query|vary values)>`` holds the entry, and
``pagecache:vary:<sha256(GET|host|path?query)>`` the header names the backend's ``Vary``
listed for that URL (so a lookup knows which request headers pick the variant). HEAD is
served from the GET entry. Stored as ``<json meta>\\n<body bytes>``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import Counter
from pydantic import Field, field_validator
from redis.client import NEVER_DECODE

from gateway.errors import REDIS_FAILURES
from gateway.headers import normalized
from gateway.paths import item_of, item_pattern
from gateway.plugin import Commands, Plugin, PluginConfig, RequestContext, ResponseHead

log = logging.getLogger("plugins.page_cache")

CACHE = Counter("gateway_page_cache_total", "Page cache lookups and stores", ["outcome"])
STATE = "page_cache"
OUTCOME = "page_cache.outcome"
_METHOD_OVERRIDES = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
_UNCACHEABLE_VARY = frozenset({"cookie", "authorization", "proxy-authorization"})
VARY_MEMO = 10_000  # URLs whose Vary names are remembered in-process
# Never stored: per-request or per-visitor headers, and ones recomputed on a hit.
UNSTORED = frozenset(
    "set-cookie x-request-id x-cache age date server content-length transfer-encoding"
    " connection keep-alive retry-after".split()
)
UNSTORED_PREFIXES = ("ratelimit-", "x-session-")


class PageCacheConfig(PluginConfig):
    paths: tuple[str, ...] = ("/products/",)
    ttl: int = Field(60, gt=0, description="seconds, when the backend sends no max-age")
    max_ttl: int = Field(3600, gt=0, description="cap on the backend's max-age")
    max_body_bytes: int = Field(1 << 20, gt=0, le=64 << 20)
    cache_authenticated: bool = False
    only_top: int | None = Field(None, gt=0)
    pattern: str = "/products/{item}"
    ranking_key: str = Field("viewed:ranking", min_length=1)
    top_refresh: float = Field(5.0, gt=0)
    wait_timeout: float = Field(5.0, gt=0, description="how long followers wait")
    # Tell the backend, on a session's next request, what the cache did for its last
    # GET/HEAD of a cached path (X-Session-Page-Cache): for a debug page or a demo.
    report: bool = False

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or any(not p.startswith("/") for p in v):
            raise ValueError("must list path prefixes starting with /")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        item_pattern(v)
        return v


@dataclass(slots=True)
class Entry:
    status: int
    headers: list[tuple[str, str]]
    vary: dict[str, str]  # lower-cased header name -> request value it was stored for
    stored_at: float
    ttl: int
    body: bytes

    def dump(self) -> bytes:
        meta = {"s": self.status, "h": self.headers, "v": self.vary, "t": self.stored_at}
        return orjson.dumps(meta) + b"\n" + self.body

    @classmethod
    def load(cls, raw: bytes) -> Entry:
        meta_raw, _, body = raw.partition(b"\n")
        meta = orjson.loads(meta_raw)
        return cls(
            int(meta["s"]),
            [(str(k), str(v)) for k, v in meta["h"]],
            {str(k): str(v) for k, v in meta["v"].items()},
            float(meta["t"]),
            0,
            body,
        )

    def fits(self, request: web.Request) -> bool:
        return all(_vary_value(request, n) == v for n, v in self.vary.items())


@dataclass(slots=True)
class Flight:
    """One upstream fetch that concurrent misses of the same key wait for."""

    done: asyncio.Future[Entry | None]
    storing: bool = False


@dataclass(slots=True)
class State:
    base: str  # sha256 of method|host|target: names the vary key and the flight
    leader: Flight | None = None
    flight_key: str = ""
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    entry: Entry | None = None  # headers decided, body still streaming


def _vary_value(request: web.Request, name: str) -> str:
    return ",".join(request.headers.getall(name, ()))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def shared_ttl(cc: dict[str, str], default: int, cap: int) -> int | None:
    """Seconds a shared cache may keep an answer with these Cache-Control directives, or
    None when it must not. ``s-maxage`` is for shared caches only and wins over
    ``max-age``, so a backend can say "browsers: revalidate every time (max-age=0);
    the gateway: keep it 30 s (s-maxage=30)". ``private``, ``no-store`` and ``no-cache``
    bind shared caches too (no-cache: not without revalidating, which this cache does
    not do)."""
    if {"private", "no-store", "no-cache"} & cc.keys():
        return None
    raw = cc["s-maxage"] if "s-maxage" in cc else cc.get("max-age")
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) == 0:
        return None
    return min(int(raw), cap)


def cache_control(headers: CIMultiDict[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in headers.getall("Cache-Control", ()):
        for part in value.split(","):
            k, _, v = part.strip().partition("=")
            if k:
                out[k.lower()] = v.strip().strip('"')
    return out


class PageCache(Plugin):
    name = "page_cache"
    Config = PageCacheConfig
    fault_policy = "open"

    config: PageCacheConfig

    async def startup(self) -> None:
        self._prefix = self.services.keys.named("pagecache:")
        self._cookie = self.services.settings.session.cookie.name
        self._vary: dict[str, tuple[str, ...]] = {}
        self._flights: dict[str, Flight] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._item_re = item_pattern(self.config.pattern)
        self._top: frozenset[str] = frozenset()
        self._top_task: asyncio.Task[None] | None = None
        if self.config.only_top:
            await self._refresh_top()
            self._top_task = asyncio.create_task(self._top_loop(), name="page-cache-top")

    async def shutdown(self) -> None:
        if self._top_task is not None:
            self._top_task.cancel()
        if self._background:
            await asyncio.wait(self._background, timeout=5)

    # -- which requests ------------------------------------------------------------------

    def _on_path(self, ctx: RequestContext) -> bool:
        return ctx.request.method in ("GET", "HEAD") and any(
            ctx.path.startswith(p) for p in self.config.paths
        )

    def _eligible(self, ctx: RequestContext) -> bool:
        return self._on_path(ctx) and self._bypass(ctx) is None

    def _bypass(self, ctx: RequestContext) -> str | None:
        """Why a request on a cached path is neither served from the cache nor stored,
        or None when it may be."""
        req = ctx.request
        if "Authorization" in req.headers:
            return "authorization"
        # SECURITY: an answer may only be shared if nothing outside the key shaped it. A
        # GET body, or a method override a framework honours (Rails, Laravel, Symfony
        # read X-HTTP-Method-Override and friends), is invisible to the key: such a
        # request is neither served from the cache nor stored. Request headers a backend
        # reflects are its own to declare, in Vary (README: page_cache).
        h = req.headers
        if req.body_exists or "Transfer-Encoding" in h or h.get("Content-Length", "0") != "0":
            return "request-body"
        if any(normalized(n) in _METHOD_OVERRIDES for n in req.headers):
            return "method-override"
        s = ctx.session
        if s is not None and s.authenticated and not self.config.cache_authenticated:
            return "logged-in"
        if self.config.only_top:
            item = item_of(self._item_re, ctx.path)
            if item is None or item not in self._top:
                return "not-top"
        return None

    # -- report: what the cache did for a session's last cached-path request ----------

    def _report_key(self, key_id: str) -> str:
        return self.services.keys.of("pagecache_last", key_id)

    def prefetch(self, ctx: RequestContext, key_id: str) -> Commands:
        return (("GET", self._report_key(key_id)),) if self.config.report else ()

    def _tell_backend(self, ctx: RequestContext) -> None:
        pre = ctx.prefetched.get(self.name)
        if pre and isinstance(pre[0], str):
            ctx.session_headers["X-Session-Page-Cache"] = pre[0]

    def _outcome(self, ctx: RequestContext, outcome: str, age: int | None = None) -> None:
        if self.config.report:
            ctx.state[OUTCOME] = (outcome, age)

    async def sessions_deleted(self, key_ids: list[str]) -> None:
        if self.config.report and key_ids:
            async with asyncio.timeout(self.services.redis_timeout):
                await self.services.redis.delete(*[self._report_key(k) for k in key_ids])

    async def _report(self, ctx: RequestContext) -> None:
        # Written before the answer goes out (not behind, in complete): the report must
        # be there for the session's very next request, however quick.
        got = ctx.state.pop(OUTCOME, None)
        s = ctx.session
        if got is None or s is None:
            return
        outcome, age = got
        value = f"outcome={outcome};path={quote(ctx.path, safe='/')};at={time.time():.3f}"
        if age is not None:
            value += f";age={age}"
        ttl = self.services.settings.session.idle_ttl
        try:
            async with asyncio.timeout(self.services.redis_timeout):
                await self.services.redis.set(self._report_key(s.key_id), value, ex=ttl)
        except REDIS_FAILURES as e:
            log.warning("page cache report failed: %s: %s", type(e).__name__, e)

    def _entry_key(self, base: str, request: web.Request, names: tuple[str, ...]) -> str:
        if not names:
            return f"{self._prefix}{base}"
        values = "\x00".join(f"{n}:{_vary_value(request, n)}" for n in names)
        return f"{self._prefix}{_sha(base + '|' + values)}"

    # -- request: hits, and waiting for a leader ----------------------------------------

    async def request(self, ctx: RequestContext) -> web.StreamResponse | None:
        if self.config.report:
            self._tell_backend(ctx)
        if not self._on_path(ctx):
            return None
        bypass = self._bypass(ctx)
        if bypass is not None:
            self._outcome(ctx, f"bypass-{bypass}")
            return None
        req = ctx.request
        # The canonical target, as sent upstream: every spelling of a URL shares one entry.
        base = _sha(f"GET|{req.host}|{ctx.target}")
        st = State(base)
        ctx.state[STATE] = st
        names = self._vary.get(base)
        key: str | None = None
        try:
            async with asyncio.timeout(self.services.redis_timeout):
                if names is None:
                    raw_names = await self.services.redis.get(f"{self._prefix}vary:{base}")
                    if raw_names is not None:
                        names = tuple(n for n in str(raw_names).split(",") if n)
                        self._remember(base, names)
                if names is not None:
                    key = self._entry_key(base, req, names)
                    # The body is bytes: read it undecoded from the shared (decoding) client.
                    raw = await self.services.redis.execute_command(
                        "GET", key, **{NEVER_DECODE: True}
                    )
                    if raw is not None:
                        entry = Entry.load(bytes(raw))
                        if entry.fits(req):
                            CACHE.labels("hit").inc()
                            return self._hit(ctx, entry)
        except REDIS_FAILURES as e:
            CACHE.labels("redis-error").inc()
            log.warning("page cache read failed: %s: %s", type(e).__name__, e)
        except (ValueError, KeyError, TypeError) as e:
            CACHE.labels("corrupt").inc()
            log.warning("page cache entry unreadable: %s", e)
        CACHE.labels("miss").inc()
        self._outcome(ctx, "miss")
        if req.method != "GET":
            return None
        # Before the URL's Vary names are known, misses gather under the URL alone;
        # a follower checks that the leader's variant fits its own request.
        flight_key = key or base
        flight = self._flights.get(flight_key)
        if flight is None:
            flight = Flight(asyncio.get_running_loop().create_future())
            self._flights[flight_key] = flight
            st.leader, st.flight_key = flight, flight_key
            task = asyncio.current_task()
            if task is not None:
                # Whatever happens to this request (upstream down, client gone), the
                # followers are released when its handler ends.
                task.add_done_callback(lambda _t: self._release(flight_key, flight, None))
            return None
        try:
            async with asyncio.timeout(self.config.wait_timeout):
                entry_or_none = await asyncio.shield(flight.done)
        except TimeoutError:
            entry_or_none = None
        if entry_or_none is not None and entry_or_none.fits(req):
            CACHE.labels("collapsed").inc()
            return self._hit(ctx, entry_or_none)
        return None

    def _hit(self, ctx: RequestContext, entry: Entry) -> web.Response:
        headers: CIMultiDict[str] = CIMultiDict(entry.headers)
        headers["X-Cache"] = "HIT"
        age = max(0, int(time.time() - entry.stored_at))
        headers["Age"] = str(age)
        self._outcome(ctx, "hit", age)
        return web.Response(status=entry.status, body=entry.body, headers=headers)

    def _remember(self, base: str, names: tuple[str, ...]) -> None:
        if len(self._vary) >= VARY_MEMO:
            self._vary.pop(next(iter(self._vary)))
        self._vary[base] = names

    def _release(self, flight_key: str, flight: Flight, entry: Entry | None) -> None:
        if not flight.done.done():
            flight.done.set_result(entry)
        if not flight.storing and self._flights.get(flight_key) is flight:
            del self._flights[flight_key]

    # -- response: decide, then collect the body -----------------------------------------

    async def response(self, ctx: RequestContext, head: ResponseHead) -> None:
        if head.from_upstream and self._on_path(ctx):
            head.headers["X-Cache"] = "MISS"
        if self.config.report:
            await self._report(ctx)
        st = ctx.state.get(STATE)
        if not isinstance(st, State) or st.leader is None:
            return
        why = self._uncacheable(ctx, head)
        if why is not None:
            CACHE.labels(f"not-stored-{why}").inc()
            self._release(st.flight_key, st.leader, None)
            return
        ttl = shared_ttl(cache_control(head.headers), self.config.ttl, self.config.max_ttl)
        assert ttl is not None  # _uncacheable said so
        names = tuple(
            sorted(
                {
                    n.strip().lower()
                    for v in head.headers.getall("Vary", ())
                    for n in v.split(",")
                    if n.strip()
                }
            )
        )
        stored = [
            (k, v)
            for k, v in head.headers.items()
            if k.lower() not in UNSTORED and not k.lower().startswith(UNSTORED_PREFIXES)
        ]
        req = ctx.request
        st.entry = Entry(
            head.status, stored, {n: _vary_value(req, n) for n in names}, time.time(), ttl, b""
        )

        def tap(chunk: bytes | None) -> None:
            self._collect(ctx, st, names, chunk)

        ctx.body_tap = tap

    def _uncacheable(self, ctx: RequestContext, head: ResponseHead) -> str | None:
        if not head.from_upstream or head.status != 200:
            return "status"
        h = head.headers
        if any(not v.startswith(f"{self._cookie}=") for v in h.getall("Set-Cookie", ())):
            return "set-cookie"  # the gateway's own session cookie is per visitor, not stored
        if shared_ttl(cache_control(h), self.config.ttl, self.config.max_ttl) is None:
            return "cache-control"
        varied = {
            n.strip().lower().replace("_", "-") for v in h.getall("Vary", ()) for n in v.split(",")
        }
        # SECURITY: the key is built from the client's request headers. Cookie or
        # Authorization would put credentials (the raw session token) into Redis, and
        # X-Session-* are the gateway's own headers, which the client never controls.
        if (
            "*" in varied
            or varied & _UNCACHEABLE_VARY
            or any(n.startswith("x-session-") for n in varied)
        ):
            return "vary"
        s = ctx.session
        if ctx.logged_in or (
            s is not None and s.authenticated and not self.config.cache_authenticated
        ):
            return "authenticated"
        cl = h.get("Content-Length")
        if cl is not None and (not cl.isdigit() or int(cl) > self.config.max_body_bytes):
            return "size"
        return None

    def _collect(
        self, ctx: RequestContext, st: State, names: tuple[str, ...], chunk: bytes | None
    ) -> None:
        # Runs inside the core's streaming loop: it must never raise.
        entry, flight = st.entry, st.leader
        if entry is None or flight is None:
            return
        if chunk is not None:
            st.size += len(chunk)
            if st.size > self.config.max_body_bytes:
                CACHE.labels("not-stored-size").inc()
                st.chunks.clear()
                st.entry = None
                ctx.body_tap = None
                self._release(st.flight_key, flight, None)
            else:
                st.chunks.append(chunk)
            return
        entry.body = b"".join(st.chunks)
        st.chunks.clear()
        flight.storing = True
        self._release(st.flight_key, flight, entry)
        task = asyncio.create_task(self._store(ctx.request, st, names, entry))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _store(
        self, request: web.Request, st: State, names: tuple[str, ...], entry: Entry
    ) -> None:
        assert st.leader is not None
        key = self._entry_key(st.base, request, names)
        try:
            async with asyncio.timeout(self.services.redis_timeout * 2):
                # The entry and the URL's Vary names are in two slots in a cluster: two
                # writes there, not one transaction (either alone is a miss, not a
                # wrong answer: an entry is only read through names that fit it).
                transaction = not self.services.cluster
                async with self.services.redis.pipeline(transaction=transaction) as pipe:
                    pipe.set(key, entry.dump(), ex=entry.ttl)
                    # The names outlive no variant: refreshed with every store.
                    pipe.set(f"{self._prefix}vary:{st.base}", ",".join(names), ex=entry.ttl)
                    await pipe.execute()
            self._remember(st.base, names)
            CACHE.labels("stored").inc()
        except REDIS_FAILURES as e:
            CACHE.labels("redis-error").inc()
            log.warning("page cache store failed: %s: %s", type(e).__name__, e)
        finally:
            st.leader.storing = False
            self._release(st.flight_key, st.leader, entry)

    # -- only_top ---------------------------------------------------------------------------

    async def _refresh_top(self) -> None:
        n = self.config.only_top or 0
        key = self.services.keys.named(self.config.ranking_key)
        try:
            async with asyncio.timeout(self.services.redis_timeout):
                top: Any = await self.services.redis.zrevrange(key, 0, n - 1)
            self._top = frozenset(str(t) for t in top)
        except REDIS_FAILURES as e:
            log.warning("page cache: ranking read failed: %s: %s", type(e).__name__, e)

    async def _top_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.top_refresh)
            await self._refresh_top()
