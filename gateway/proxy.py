"""The request path, end to end (DESIGN.md "One request, end to end")."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy

from . import metrics
from .body import ClientBodyError, RequestBody
from .config import RouteSettings, Settings
from .errors import REDIS_FAILURES, RedisUnavailable
from .forwarded import TrustedProxies, bucket, valid_host
from .headers import (
    GATEWAY_REQUEST_HEADERS,
    REQUEST_ID_RE,
    SPOOFABLE_REQUEST_HEADERS,
    HeaderDrop,
    encode_value,
    header_name_for,
    is_session_header,
    parse_cookie_values,
    remove_cookie,
    set_cookie_name,
    strip_headers,
)
from .instructions import collect, dropped
from .limits import AddressHolds, TooMany
from .logs import Throttle, request_id_var
from .paths import PathError, split_target
from .plugin import CartInstruction, Chain, Plugin, RequestContext, ResponseHead
from .responses import text_response, unavailable
from .routing import Router
from .sessions import RESERVED_FIELDS, Session, SessionStore, valid_token
from .signing import sign
from .upstream import Upstream
from .upstream_client import IDEMPOTENT, ConnectFailed, StreamsFull, UpstreamResponse
from .websocket import is_websocket, proxy_websocket

if TYPE_CHECKING:
    from .activity import ActivityWriter

log = logging.getLogger("gateway.proxy")
T = TypeVar("T")

# Never from the client, whatever client_headers.keep says: the gateway sets these itself
# (Content-Length from the body it actually sends).
_ALWAYS_DROP = (*GATEWAY_REQUEST_HEADERS, "host", "content-length")
# Control characters other than HTAB in a header; a lone surrogate is an undecodable
# byte (both aiohttp parsers decode with surrogateescape) that cannot be sent on.
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
# Instructions that store something in the session: on a guest route they create one.
_NEEDS_SESSION = (
    "x-session-set",
    "x-session-cart-add",
    "x-session-cart-remove",
    "x-session-cart-clear",
)
# An upstream body that breaks off, or stalls past read_timeout.
_BODY_FAILURES = (aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError, TimeoutError)
SMALL_BODY = 64 * 1024  # read whole and sent with the headers; larger bodies stream
MAX_PAGE = 512  # bytes of current_page kept per session
_STARTED = web.RequestKey("gateway_response_started", web.StreamResponse)


# Unique, not secret: a per-process random prefix and a counter cost no syscall per
# request (uuid4 reads os.urandom every time).
_RID_PREFIX = secrets.token_hex(8)
_rid_counter = itertools.count(1)


def _new_request_id() -> str:
    return f"{_RID_PREFIX}{next(_rid_counter):016x}"


class Gateway:
    def __init__(
        self,
        settings: Settings,
        store: SessionStore,
        activity: ActivityWriter,
        chain: Chain,
        ws_client: aiohttp.ClientSession,
    ) -> None:
        self.settings = settings
        self.store = store
        self.activity = activity
        self.chain = chain
        # WebSocket upgrades only; plain HTTP goes through the upstreams' pools.
        self.ws_client = ws_client
        self.router = Router(settings.routes, settings.paths)
        self.upstreams = {n: Upstream(n, u) for n, u in settings.upstreams.items()}
        self.cookie = settings.session.cookie
        self._cookie_tail, self._cookie_expired = _cookie_strings(settings)
        self.redis_timeout = settings.redis.timeout
        self.limits = settings.limits
        self.proxies = TrustedProxies(settings.trusted_proxies)
        self.holds = AddressHolds(settings.limits.upstream_per_address)
        ch = settings.client_headers
        self._drop = HeaderDrop(
            (*SPOOFABLE_REQUEST_HEADERS, *ch.drop, *_ALWAYS_DROP),
            keep=[k for k in ch.keep if k not in _ALWAYS_DROP],
        )
        self._refusals = Throttle()
        self._background: set[asyncio.Task[tuple[bool, object]]] = set()
        self._request_counters: dict[tuple[str, int], Any] = {}
        sig = settings.signing
        self._signing = (sig.key.get_secret_value().encode(), sig.header) if sig else None

    # -- entry point ---------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        rids = request.headers.getall("X-Request-Id", ())
        rid = rids[0] if len(rids) == 1 and REQUEST_ID_RE.fullmatch(rids[0]) else _new_request_id()
        request_id_var.set(rid)
        route: RouteSettings | None = None
        try:
            bad = self._malformed(request)
            if bad is not None:
                self._refused(request, 400, bad)
                resp: web.StreamResponse = text_response(400, f"bad request: {bad}")
            else:
                try:
                    raw_path, query = split_target(request.raw_path)
                    path, route = self.router.resolve(raw_path, request.method, request.host)
                except PathError as e:
                    self._refused(request, e.status, f"request target: {e}")
                    resp = text_response(e.status, f"bad request: {e}")
                else:
                    if route is None:
                        resp = text_response(404, "no route")
                    else:
                        resp = await self._handle_route(request, route, rid, path, path + query)
        except web.HTTPException:
            raise
        except asyncio.CancelledError:
            raise
        except ConnectionResetError:
            # The client went away mid-response; nothing to answer and nothing wrong.
            log.debug("client disconnected during %s %s", request.method, request.path)
            resp = web.Response(status=499)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            started_resp: web.StreamResponse | None = request.get(_STARTED)
            if started_resp is not None:
                # Headers are out: a second response would land inside the body. Cut the
                # connection so the client sees a truncated response.
                if request.transport is not None:
                    request.transport.close()
                return started_resp
            resp = text_response(500, "gateway error")
        if not resp.prepared:
            resp.headers.setdefault("X-Request-Id", rid)
        label = (route.path if route else "-", resp.status // 100)
        counter = self._request_counters.get(label)
        if counter is None:
            # labels() hashes and locks on every call; the children are few and fixed.
            counter = metrics.REQUESTS.labels(label[0], f"{label[1]}xx")
            self._request_counters[label] = counter
        counter.inc()
        metrics.LATENCY.observe(time.perf_counter() - started)
        return resp

    def _malformed(self, request: web.Request) -> str | None:
        """Request smuggling shapes and values the parser may have let through (defence
        in depth: aiohttp's C parser rejects most of these itself, its pure-Python parser
        fewer)."""
        h = request.headers
        cls = h.getall("Content-Length", ())
        tes = h.getall("Transfer-Encoding", ())
        if len(cls) > 1:
            return "duplicate Content-Length"
        if cls and tes:
            return "Content-Length with Transfer-Encoding"
        if tes and [t.strip().lower() for t in ",".join(tes).split(",")] != ["chunked"]:
            return "unsupported Transfer-Encoding"
        if cls and not (cls[0].isascii() and cls[0].isdigit()):
            return "invalid Content-Length"
        hosts = h.getall("Host", ())
        # SECURITY: the host a backend sees (X-Forwarded-Host) meets one rule wherever it
        # came from: the Host header, or an absolute-form target's authority, which
        # aiohttp's pure-Python parser reports as request.host.
        if len(hosts) > 1 or not all(valid_host(v) for v in hosts):
            return "invalid Host"
        if request.host and not valid_host(request.host):
            return "invalid Host"
        for name, value in h.items():
            if _BAD_VALUE.search(value) or _BAD_VALUE.search(name):
                return "invalid header value"
        return None

    # -- one route -----------------------------------------------------------------------

    async def _handle_route(
        self, request: web.Request, route: RouteSettings, rid: str, path: str, target: str
    ) -> web.StreamResponse:
        ctx = RequestContext(
            request=request,
            route=route,
            request_id=rid,
            path=path,
            target=target,
            client_address=self.proxies.client_address(request),
        )
        set_cookies: list[str] = []
        plugins = self.chain.for_route(route)
        if route.session != "none":
            early = await self._resolve_session(ctx, set_cookies)
            if early is not None:
                return early
        answer: web.StreamResponse | None = None
        for p in plugins:
            ok, result = await self.chain.guarded(p, p.request, ctx)
            if not ok:
                return _with_cookies(unavailable(), set_cookies)
            if result is not None:
                answer = result
                break

        if answer is not None:
            return await self._answer_directly(ctx, plugins, answer, set_cookies)

        if route.websocket and is_websocket(request):
            return await proxy_websocket(self, ctx)

        upstream = self.upstreams[route.upstream]
        headers = self.upstream_headers(ctx)
        try:
            body = await self._request_body(request, headers)
            with self.holds.hold(bucket(ctx.client_address)):
                upstream_resp = await self._send(request, ctx.target, upstream, headers, body)
                try:
                    return await self._respond(ctx, plugins, upstream_resp, set_cookies)
                finally:
                    upstream_resp.release()
        except UpstreamFailure as f:
            # An expired cookie decided above still goes out with the error.
            return _with_cookies(text_response(f.status, f.message, f.headers), set_cookies)
        except ClientBodyError as e:
            self._refused(request, e.status, e.reason)
            text = f"bad request: {e.reason}" if e.status == 400 else e.reason
            resp = _with_cookies(text_response(e.status, text), set_cookies)
            # The rest of that body is not worth waiting for.
            resp.force_close()
            if e.status != 413:
                # A client that stopped sending, or whose framing cannot be trusted,
                # gets its answer and the connection is closed at once (aiohttp would
                # otherwise linger, reading what it takes for the rest of the body, for
                # up to 10 s). A 413 lingers, so that a client still sending sees it.
                await resp.prepare(request)
                await resp.write_eof()
                if request.transport is not None:
                    request.transport.close()
            return resp
        except TooMany:
            self._refused(request, 429, "too many upstream connections from this client")
            resp = text_response(
                429, "too many concurrent requests from this address", {"Retry-After": "1"}
            )
            return _with_cookies(resp, set_cookies)

    async def _request_body(
        self, request: web.Request, headers: CIMultiDict[str]
    ) -> bytes | RequestBody | None:
        """The body to send upstream: whole when small (read before any upstream
        connection is taken), else a stream; its length is the gateway's own."""
        if not request.body_exists:
            return None
        body = RequestBody(request, self.limits)
        data = await body.buffer(self.limits.buffer_body_bytes)
        if data is not None:
            return data
        if body.length is not None:
            headers["Content-Length"] = str(body.length)
        return body

    def _refused(self, request: web.Request, status: int, why: str) -> None:
        if self._refusals.allow():
            more = self._refusals.take_suppressed()
            log.info(
                "%d for %s %s from %s: %s%s",
                status,
                request.method,
                repr(request.raw_path[:200]),
                request.remote,
                why,
                f" ({more} more refusals not logged)" if more else "",
            )

    async def _call_redis(self, op: str, aw: Awaitable[T], *, bounded: bool = True) -> T:
        """Await a Redis operation within redis.timeout (``bounded=False``: the operation
        enforces it itself), turning every failure into RedisUnavailable."""
        try:
            if not bounded:
                return await aw
            async with asyncio.timeout(self.redis_timeout):
                return await aw
        except REDIS_FAILURES as e:
            metrics.REDIS_ERRORS.labels(op).inc()
            log.warning("redis %s failed: %s: %s", op, type(e).__name__, e)
            raise RedisUnavailable(op) from e

    async def _resolve_session(
        self, ctx: RequestContext, set_cookies: list[str]
    ) -> web.StreamResponse | None:
        request, route = ctx.request, ctx.route
        values = parse_cookie_values(request.headers.getall("Cookie", ()), self.cookie.name)
        # Two values for our cookie (e.g. one planted on a parent domain) is ambiguous:
        # take neither rather than guess which one the user really holds.
        token = values[0] if len(values) == 1 and valid_token(values[0]) else None
        stale = bool(values)
        if token is not None:
            key_id = self.store.keys.key_id(token)
            hit, session = self.store.cached(token, key_id)
            takers = self.chain.prefetchers(route)
            try:
                # A near-cache hit on a route without prefetch reads is answered right
                # here, without the coroutines of a Redis call.
                ctx.session = (
                    session
                    if hit and not takers
                    else await self._load(ctx, token, key_id, takers, hit, session)
                )
            except RedisUnavailable:
                ctx.redis_ok = False
                # SECURITY: a required route's backend never sees a request without a
                # live session, whatever on_redis_error says: a client that can slow
                # Redis down (or just sends a well-formed random cookie while it is
                # failing) must not get through as anonymous.
                if route.on_redis_error == "closed" or route.session == "required":
                    return unavailable("session store unavailable")
                return None
            stale = ctx.session is None
        if stale and ctx.session is None and len(values) <= 1:
            set_cookies.append(self._expired_cookie())
        if ctx.session is None and route.session == "required":
            return self._unauthenticated(ctx, set_cookies)
        return None

    async def _load(
        self,
        ctx: RequestContext,
        token: str,
        key_id: str,
        takers: list[Plugin],
        hit: bool,
        cached: Session | None,
    ) -> Session | None:
        """The session (``cached`` when the near-cache answered, ``hit``), with the
        plugins' prefetch reads in the same pipeline."""
        spans: list[tuple[str, int]] = []

        def prefetch(key_id: str) -> tuple[tuple[str, ...], ...]:
            commands: list[tuple[str, ...]] = []
            for p in takers:
                mine = p.prefetch(ctx, key_id)
                spans.append((p.name, len(mine)))
                commands.extend(mine)
            return tuple(commands)

        session = cached
        if not hit:
            session, results = await self._call_redis(
                "load", self.store.load(token, key_id, prefetch if takers else None),
                bounded=False,
            )  # fmt: skip
        elif session is not None:
            results = await self._call_redis(
                "load", self.store.prefetch_only(key_id, prefetch), bounded=False
            )
        if session is not None:
            i = 0
            for name, n in spans:
                ctx.prefetched[name] = results[i : i + n]
                i += n
        return session

    def _unauthenticated(self, ctx: RequestContext, set_cookies: list[str]) -> web.StreamResponse:
        route = ctx.route
        if route.login_url and ctx.request.method in ("GET", "HEAD"):
            # Only a same-site relative path goes into next: an absolute or
            # scheme-relative URL there would make the login page an open redirect.
            nxt = ctx.target
            if not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:
                nxt = "/"
            sep = "&" if "?" in route.login_url else "?"
            resp = web.Response(
                status=302,
                headers={"Location": f"{route.login_url}{sep}next={quote(nxt, safe='')}"},
            )
        else:
            resp = text_response(401, "login required")
        return _with_cookies(resp, set_cookies)

    # -- towards the upstream ------------------------------------------------------------

    def upstream_headers(self, ctx: RequestContext) -> CIMultiDict[str]:
        request = ctx.request
        headers = strip_headers(request.headers, drop=self._drop)
        # A Cookie header is still here only if the client did not list it in Connection.
        cookies = headers.popall("Cookie", [])
        if cookies:
            kept = (
                "; ".join(cookies)
                if self.cookie.forward
                else remove_cookie(cookies, self.cookie.name)
            )
            if kept:
                headers["Cookie"] = kept
        # Everything below is added after all stripping, so nothing the client sent
        # (not even "Connection: X-Forwarded-For") can remove or shadow it.
        peer = request.remote or ""
        trusted = self.proxies.trusted(peer)
        xff = ", ".join(request.headers.getall("X-Forwarded-For", ())) if trusted else ""
        headers["X-Forwarded-For"] = f"{xff}, {peer}" if xff else peer
        proto = request.headers.get("X-Forwarded-Proto", "") if trusted else ""
        headers["X-Forwarded-Proto"] = proto if proto in ("http", "https") else request.scheme
        host = request.headers.get("X-Forwarded-Host", "") if trusted else ""
        # A trusted proxy's host meets the rule the client's Host met (_malformed).
        headers["X-Forwarded-Host"] = host if host and valid_host(host) else request.host
        headers["X-Request-Id"] = ctx.request_id
        if ctx.route.session != "none":
            self._session_headers(ctx, headers)
        if self._signing is not None:
            # Last, over the headers exactly as they leave (also on session: none routes:
            # the backend learns the request came through the gateway, with no identity).
            key, name = self._signing
            headers.popall(name, None)
            headers.add(name, sign(key, request.method, ctx.target, headers, header=name))
        return headers

    def _session_headers(self, ctx: RequestContext, headers: CIMultiDict[str]) -> None:
        s = ctx.session
        if s is not None:
            only = ctx.route.session_fields
            for name, value in s.fields.items():
                if only is not None and name not in only:
                    continue
                header = header_name_for(name)
                if header is None:
                    continue
                # add, not set: every X-Session-* spelling was stripped above, and field
                # names are unique, so there is nothing to replace (set scans them all).
                headers.add(header, encode_value(value))
        # Set after the fields: a stored field named id or authenticated (other
        # software's) is replaced by the gateway's own.
        headers["X-Session-Authenticated"] = (
            "true" if s is not None and s.authenticated else "false"
        )
        if s is None:
            return
        headers["X-Session-Id"] = s.id
        for name, value in ctx.session_headers.items():
            if is_session_header(name):
                headers[name] = encode_value(value)

    async def _send(
        self,
        request: web.Request,
        target: str,
        upstream: Upstream,
        headers: CIMultiDict[str],
        body: bytes | RequestBody | None,
    ) -> UpstreamResponse:
        name = upstream.name
        last_error = ""
        for server in upstream.candidates():
            try:
                resp = await upstream.pools[server].request(request.method, target, headers, body)
            except ConnectFailed as e:
                # The connection was refused, so the request never left: the next
                # server may take it, whatever the method, as long as no byte of a
                # streamed body has been consumed (a small body is whole in memory).
                upstream.eject(server)
                metrics.UPSTREAM_ERRORS.labels("connect").inc()
                last_error = str(e)
                if not isinstance(body, RequestBody) or not body.started:
                    continue
                raise UpstreamFailure(502, "bad gateway: upstream refused the connection") from None
            except StreamsFull:
                metrics.UPSTREAM_ERRORS.labels("busy").inc()
                raise UpstreamFailure(
                    503, "service unavailable: too many uploads in progress", retry_after=5
                ) from None
            except TimeoutError:
                # A connect or a wait for a free pooled connection (PoolTimeout), or no
                # answer within read_timeout (aiohttp's SocketTimeoutError).
                metrics.UPSTREAM_ERRORS.labels("timeout").inc()
                raise UpstreamFailure(
                    504, "gateway timeout: upstream did not answer in time"
                ) from None
            except (aiohttp.ServerDisconnectedError, OSError) as e:
                # Sent, but the server dropped the connection without an answer. Only an
                # idempotent request whose body (if any) is in memory may be tried again
                # elsewhere.
                metrics.UPSTREAM_ERRORS.labels("disconnect").inc()
                last_error = str(e)
                if request.method in IDEMPOTENT and not isinstance(body, RequestBody):
                    log.warning("upstream %s %s dropped the connection; retrying", name, server)
                    continue
                raise UpstreamFailure(502, "bad gateway: upstream closed the connection") from None
            except (aiohttp.ClientError, HttpProcessingError) as e:
                metrics.UPSTREAM_ERRORS.labels("protocol").inc()
                log.warning("upstream %s %s: %s: %s", name, server, type(e).__name__, e)
                raise UpstreamFailure(502, "bad gateway: invalid upstream response") from None
            upstream.restore(server)
            return resp
        log.warning("upstream %s: no server answered (%s)", name, last_error)
        raise UpstreamFailure(502, "bad gateway: no upstream server answered")

    # -- back towards the client ---------------------------------------------------------

    async def _respond(
        self,
        ctx: RequestContext,
        plugins: list[Plugin],
        upstream_resp: UpstreamResponse,
        set_cookies: list[str],
    ) -> web.StreamResponse:
        request = ctx.request
        try:
            await self._apply_instructions(ctx, upstream_resp.headers, plugins, set_cookies)
        except RedisUnavailable:
            return _with_cookies(
                unavailable("session store unavailable; try again"),
                set_cookies,
            )
        headers = strip_headers(upstream_resp.headers)
        backend_cookies = headers.getall("Set-Cookie", ())
        if any(set_cookie_name(v) == self.cookie.name for v in backend_cookies):
            # The gateway owns this cookie; a backend must not overwrite the token.
            headers.popall("Set-Cookie")
            for v in backend_cookies:
                if set_cookie_name(v) != self.cookie.name:
                    headers.add("Set-Cookie", v)
            dropped("set-cookie", "gateway-cookie")
        for c in set_cookies:
            headers.add("Set-Cookie", c)
        headers["X-Request-Id"] = ctx.request_id
        head = ResponseHead(upstream_resp.status, headers, from_upstream=True)
        if not await self._response_hooks(ctx, plugins, head):
            return _with_cookies(unavailable(), set_cookies)
        self.record_activity(ctx)
        length = upstream_resp.content_length
        if (
            length is not None
            and length <= SMALL_BODY
            and request.method != "HEAD"
            and head.status not in (204, 304)
        ):
            return await self._respond_small(ctx, plugins, upstream_resp, head, set_cookies)
        resp = web.StreamResponse(status=head.status, reason=upstream_resp.reason)
        resp.headers.update(head.headers)
        if "Content-Length" in head.headers:
            resp.content_length = int(head.headers["Content-Length"])
        request[_STARTED] = resp
        send = self.limits.send_timeout
        try:
            async with asyncio.timeout(send):
                await resp.prepare(request)
            if request.method != "HEAD" and head.status not in (204, 304):
                async for chunk in upstream_resp.content.iter_any():
                    # Each write waits while the client's socket is full: a client that
                    # stops reading must not hold the upstream connection for ever.
                    async with asyncio.timeout(send):
                        await resp.write(chunk)
                    if ctx.body_tap is not None:
                        ctx.body_tap(chunk)
            async with asyncio.timeout(send):
                await resp.write_eof()
        except _BODY_FAILURES as e:
            # Headers are gone already: all we can do is cut the connection so the
            # client sees a truncated response instead of a silently short one. A
            # TimeoutError here is either side: the upstream's read timeout or our
            # send timeout.
            log.warning("response body cut: %s", type(e).__name__ if not str(e) else e)
            metrics.UPSTREAM_ERRORS.labels("body").inc()
            if request.transport is not None:
                request.transport.close()
            self._completed(ctx, plugins)
            return resp
        if ctx.body_tap is not None:
            ctx.body_tap(None)
        self._completed(ctx, plugins)
        return resp

    async def _respond_small(
        self,
        ctx: RequestContext,
        plugins: list[Plugin],
        upstream_resp: UpstreamResponse,
        head: ResponseHead,
        set_cookies: list[str],
    ) -> web.StreamResponse:
        """A body of known, small size is read first and sent with the headers in one
        write: a third fewer syscalls per typical page, and an upstream that fails while
        sending it still gets a clean 502 instead of a cut connection."""
        try:
            body = await upstream_resp.read()
            # The upstream connection goes back before the client is written to: a
            # client that reads slowly must not keep a pooled connection waiting.
            upstream_resp.release()
        except _BODY_FAILURES as e:
            log.warning("upstream body failed: %s", e)
            metrics.UPSTREAM_ERRORS.labels("body").inc()
            # A login or logout this response carried is applied already: its cookie
            # must still reach the client, or the new session is lost to it.
            return _with_cookies(
                text_response(502, "bad gateway: incomplete upstream response"), set_cookies
            )
        resp = web.Response(
            status=head.status, reason=upstream_resp.reason, body=body, headers=head.headers
        )
        if ctx.body_tap is not None:
            ctx.body_tap(body)
            ctx.body_tap(None)
        try:
            async with asyncio.timeout(self.limits.send_timeout):
                await resp.prepare(ctx.request)
                await resp.write_eof()
        except TimeoutError:
            log.warning("client did not read the response within send_timeout; cut")
            if ctx.request.transport is not None:
                ctx.request.transport.close()
        self._completed(ctx, plugins)
        return resp

    async def _answer_directly(
        self,
        ctx: RequestContext,
        plugins: list[Plugin],
        answer: web.StreamResponse,
        set_cookies: list[str],
    ) -> web.StreamResponse:
        if not answer.prepared:
            for c in set_cookies:
                answer.headers.add("Set-Cookie", c)
            head = ResponseHead(answer.status, CIMultiDict(answer.headers), from_upstream=False)
            if not await self._response_hooks(ctx, plugins, head):
                return _with_cookies(unavailable(), set_cookies)
            answer.set_status(head.status)
            answer.headers.clear()
            answer.headers.update(head.headers)
        self.record_activity(ctx)
        self._completed(ctx, plugins)
        return answer

    async def _response_hooks(
        self, ctx: RequestContext, plugins: list[Plugin], head: ResponseHead
    ) -> bool:
        """Every plugin's response hook on ``head``; False when one failed closed."""
        ctx.response = head
        for p in plugins:
            ok, _ = await self.chain.guarded(p, p.response, ctx, head)
            if not ok:
                return False
        return True

    def record_activity(self, ctx: RequestContext) -> None:
        s = ctx.session
        # A login wrote the new session's activity fields itself: this request belongs
        # to the session it replaced.
        if s is None or not ctx.redis_ok or ctx.logged_in:
            return
        # The canonical path is visible ASCII (the decoded one may hold lone surrogates
        # that would break the activity flush for every other session).
        page = ctx.path[:MAX_PAGE]
        self.activity.record(self.store.keys.session(s.key_id), page, s.deadline)

    def _completed(self, ctx: RequestContext, plugins: list[Plugin]) -> None:
        for p in plugins:
            if type(p).complete is Plugin.complete:
                continue
            task = asyncio.create_task(
                self.chain.guarded(p, p.complete, ctx),
                name=f"complete-{p.name}",
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def close_upstreams(self) -> None:
        for u in self.upstreams.values():
            u.close()

    async def drain_background(self, seconds: float) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=seconds)

    # -- backend instructions ------------------------------------------------------------

    async def _apply_instructions(
        self,
        ctx: RequestContext,
        resp_headers: CIMultiDictProxy[str],
        plugins: list[Plugin],
        set_cookies: list[str],
    ) -> None:
        parsed = collect(resp_headers, ctx.route.instructions)
        if not parsed:
            return
        if (
            ctx.session is None
            and ctx.route.guest
            and ctx.redis_ok
            and any(k in parsed for k in _NEEDS_SESSION)
            and "x-session-login" not in parsed
            and "x-session-logout" not in parsed
        ):
            await self._guest(ctx, set_cookies)
        if "x-session-logout" in parsed:
            await self._logout(ctx, plugins, parsed["x-session-logout"], set_cookies)
        if "x-session-login" in parsed:
            await self._login(ctx, plugins, parsed["x-session-login"], set_cookies)
        if "x-session-set" in parsed:
            await self._set(ctx, parsed["x-session-set"])
        cart = [
            CartInstruction(kind, parsed[f"x-session-cart-{kind}"])
            for kind in ("clear", "remove", "add")
            if f"x-session-cart-{kind}" in parsed
        ]
        if cart:
            takers = [p for p in plugins if type(p).cart is not Plugin.cart]
            if ctx.session is None:
                dropped("cart", "no-session")
            elif not takers:
                dropped("cart", "no-cart-plugin")
            else:
                # The plugin counts what it applied (gateway_cart_instructions_total).
                for p in takers:
                    await self.chain.guarded(p, p.cart, ctx, cart)
                metrics.INSTRUCTIONS.labels("cart", "handed-to-plugin").inc(len(cart))

    async def _guest(self, ctx: RequestContext, set_cookies: list[str]) -> None:
        """A guest session for a visitor whose backend just stored something for it.

        Guests are created only when something needs one (issue 10): a visitor without a
        session is anonymous until the backend sends X-Session-Set or a cart change. A
        404, a bot, a health probe creates nothing. At most limits.guests_per_address
        per minute per client address (IPv6: /64), counted in Redis so every gateway
        shares the budget; past it the instruction is dropped and counted."""
        cap = self.limits.guests_per_address
        if cap:
            count = await self._call_redis(
                "guest", self.store.count_guest(bucket(ctx.client_address))
            )
            if count > cap:
                dropped("guest", "address-cap")
                return
        guest = self.store.new_guest()
        await self._call_redis("guest", self.store.create(guest))
        ctx.session = guest
        set_cookies.append(self._cookie(guest.token))
        metrics.INSTRUCTIONS.labels("guest", "created").inc()

    async def _login(
        self,
        ctx: RequestContext,
        plugins: list[Plugin],
        fields: dict[str, str],
        set_cookies: list[str],
    ) -> None:
        if not fields.get("user_id"):
            dropped("login", "malformed")
            return
        fields = {k: v for k, v in fields.items() if k not in RESERVED_FIELDS or k == "user_id"}
        old = ctx.session
        if old is not None:
            self.activity.discard(self.store.keys.session(old.key_id))
        new, ended = await self._call_redis(
            "login", self.store.login(old, fields), bounded=False
        )  # fmt: skip
        for p in plugins:
            # The session exists now; a plugin that cannot move its state is logged
            # rather than turning a completed login into an error.
            await self.chain.guarded(p, p.login, ctx, old, new)
        if ended:
            # The user's oldest sessions, beyond session.max_per_user.
            await self._ended(ctx, plugins, ended)
        ctx.rotated_from = old
        ctx.logged_in = True
        ctx.session = new
        self._set_session_cookie(set_cookies, self._cookie(new.token))
        metrics.INSTRUCTIONS.labels("login", "applied").inc()
        log.info(
            "login user_id=%r session=%s ended=%d", new.user_id, new.id[:12], len(ended)
        )  # fmt: skip

    async def _set(self, ctx: RequestContext, fields: dict[str, str]) -> None:
        s = ctx.session
        clean = {k: v for k, v in fields.items() if k not in RESERVED_FIELDS}
        if s is None or not clean:
            dropped("set", "no-session" if s is None else "reserved")
            return
        await self._call_redis("set", self.store.update(s, clean))
        metrics.INSTRUCTIONS.labels("set", "applied").inc()

    async def _logout(
        self,
        ctx: RequestContext,
        plugins: list[Plugin],
        params: dict[str, str],
        set_cookies: list[str],
    ) -> None:
        s = ctx.session
        everywhere = "all" in params
        self._set_session_cookie(set_cookies, self._expired_cookie())
        ctx.session = None
        if s is None:
            metrics.INSTRUCTIONS.labels("logout", "applied").inc()
            return
        # Step by step, each within redis.timeout: a failure part-way answers 503 (the
        # cookie still expires) and leaves the rest to the next logout everywhere.
        steps = self.store.logout(s, everywhere)
        n = 0
        try:
            while (ended := await self._call_redis("logout", anext(steps, None))) is not None:
                n += len(ended)
                await self._ended(ctx, plugins, ended)
        finally:
            await steps.aclose()
        metrics.INSTRUCTIONS.labels("logout", "applied").inc()
        log.info(
            "logout%s session=%s ended=%d", " everywhere" if everywhere else "", s.id[:12], n
        )  # fmt: skip

    async def _ended(self, ctx: RequestContext, plugins: list[Plugin], key_ids: list[str]) -> None:
        """These sessions are gone from Redis: their buffered activity and what the
        plugins keep for them go too."""
        for k in key_ids:
            self.activity.discard(self.store.keys.session(k))
        for p in plugins:
            await self.chain.guarded(p, p.logout, ctx, key_ids)

    # -- cookies -------------------------------------------------------------------------

    def _set_session_cookie(self, set_cookies: list[str], cookie: str) -> None:
        """``cookie`` replaces whatever this request had decided for the session cookie
        (a guest's, or the one a login just set before a logout)."""
        set_cookies[:] = [c for c in set_cookies if set_cookie_name(c) != self.cookie.name]
        set_cookies.append(cookie)

    def _cookie(self, token: str) -> str:
        return f"{self.cookie.name}={token}{self._cookie_tail}"

    def _expired_cookie(self) -> str:
        return self._cookie_expired


class UpstreamFailure(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = {"Retry-After": str(retry_after)} if retry_after else None


def _cookie_strings(settings: Settings) -> tuple[str, str]:
    """What follows ``name=<token>`` in a session cookie, and the whole expiring cookie;
    both fixed by the config, so built once."""
    c = settings.session.cookie
    attrs = [f"Path={c.path}"]
    if c.domain:
        attrs.append(f"Domain={c.domain}")
    if c.http_only:
        attrs.append("HttpOnly")
    if c.secure:
        attrs.append("Secure")
    attrs.append(f"SameSite={c.same_site}")
    tail = "; ".join(attrs)
    return (
        f"; Max-Age={settings.session.absolute_ttl}; {tail}",
        f"{c.name}=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; {tail}",
    )


def _with_cookies(resp: web.Response, set_cookies: list[str]) -> web.Response:
    """An early answer still carries the cookies this request already decided on (a new
    guest, or a login or logout that has been applied in Redis)."""
    for c in set_cookies:
        resp.headers.add("Set-Cookie", c)
    return resp
