"""The request path, end to end (DESIGN.md "One request, end to end"; docs/architecture.md
names the module behind each step).

``Gateway.handle`` checks the request (checks.py), reads its path and picks the route
(paths.py, routing.py), resolves the session (sessions/resolver.py), runs the plugins'
request hooks (chain.py), sends the request upstream with the headers the backend may
see (outbound.py, upstream.py) and streams the answer back after the backend's
instructions (instructions.py) and the response hooks; activity is recorded behind
(sessions/activity.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from . import metrics
from .access_log import AccessLog
from .body import ClientBodyError, RequestBody
from .chain import Chain
from .checks import malformed
from .config import RouteSettings, Settings
from .errors import RedisUnavailable
from .forwarded import TrustedProxies, bucket
from .headers import REQUEST_ID_RE, set_cookie_name, strip_headers
from .instructions import Applier, TooManyGuests, dropped
from .limits import AddressHolds, TooMany
from .logs import Throttle, request_id_var
from .outbound import UpstreamHeaders
from .paths import PathError, split_target
from .plugin import RequestContext, ResponseHead
from .responses import text_response, unavailable
from .routing import RouteTable
from .sessions.layer import SessionLayer
from .sessions.pageviews import PageViews
from .upstream import UpstreamFailure
from .upstream_client import UpstreamResponse
from .websocket import is_websocket, proxy_websocket

log = logging.getLogger("gateway.proxy")

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


def _cut_slow_reader(request: web.Request) -> None:
    log.warning("client did not read the response within send_timeout; cut")
    if request.transport is not None:
        request.transport.close()


class Gateway:
    def __init__(
        self,
        settings: Settings,
        table: RouteTable,
        sessions: SessionLayer,
        chain: Chain,
        ws_client: aiohttp.ClientSession,
    ) -> None:
        self.settings = settings
        # Read once per request: a reload swaps the whole table (routing.py).
        self.table = table
        self.sessions = sessions
        self.resolver = sessions.resolver
        self.instructions = Applier(
            sessions.actions, chain, sessions.cookie, chain.instructions
        )
        self.chain = chain
        # WebSocket upgrades only; plain HTTP goes through the upstreams' pools.
        self.ws_client = ws_client
        self.limits = settings.limits
        self.proxies = TrustedProxies(settings.trusted_proxies)
        self.outbound = UpstreamHeaders(settings, self.proxies)
        self.holds = AddressHolds(settings.limits.upstream_per_address)
        self.pageviews = PageViews(settings.activity)
        self._refusals = Throttle()
        self._request_counters: dict[tuple[str, int], Any] = {}
        self.access: AccessLog | None = AccessLog() if settings.logging.access_log else None
        # Built in the loop that serves it (runtime.proxy_ctx); kept for its timers.
        self._loop = asyncio.get_running_loop()

    # -- entry point ---------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        # The table is counted while a request uses it: a reload closes the pools of
        # the one it replaced (and shuts down the plugins swapped with it) only once
        # the requests begun on it are done (reload.py).
        table = self.table
        table.inflight += 1
        try:
            return await self._handle(request, table)
        finally:
            table.inflight -= 1

    async def _handle(self, request: web.Request, table: RouteTable) -> web.StreamResponse:
        started = time.perf_counter()
        rids = request.headers.getall("X-Request-Id", ())
        rid = rids[0] if len(rids) == 1 and REQUEST_ID_RE.fullmatch(rids[0]) else _new_request_id()
        request_id_var.set(rid)
        route: RouteSettings | None = None
        ctx: RequestContext | None = None
        try:
            bad = malformed(request)
            if bad is not None:
                self._refused(request, 400, bad)
                resp: web.StreamResponse = text_response(400, f"bad request: {bad}")
            else:
                try:
                    raw_path, query = split_target(request.raw_path)
                    path, route = table.router.resolve(raw_path, request.method, request.host)
                except PathError as e:
                    self._refused(request, e.status, f"request target: {e}")
                    resp = text_response(e.status, f"bad request: {e}")
                else:
                    if route is None:
                        resp = text_response(404, "no route")
                    else:
                        ctx = RequestContext(
                            request=request,
                            route=route,
                            request_id=rid,
                            path=path,
                            target=path + query,
                            client_address=self.proxies.client_address(request),
                        )
                        resp = await self._handle_route(ctx, table)
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
        seconds = time.perf_counter() - started
        metrics.LATENCY.observe(seconds)
        if self.access is not None:
            self.access.write(request, route, resp.status, seconds, ctx, rid)
        return resp

    def _refused(self, request: web.Request, status: int, why: str) -> None:
        if self._refusals.allow():
            more = self._refusals.take_suppressed()
            log.info(
                "%d for %s %s from %s: %s%s",
                status,
                request.method,
                # The path only: a query may hold a reset token or an OAuth code.
                repr(request.raw_path.partition("?")[0][:200]),
                request.remote,
                why,
                f" ({more} more refusals not logged)" if more else "",
            )

    # -- one route -----------------------------------------------------------------------

    async def _handle_route(self, ctx: RequestContext, table: RouteTable) -> web.StreamResponse:
        """The route's answer; whoever makes it, it carries ``ctx.cookies``."""
        resp = await self._answer(ctx, table)
        if not resp.prepared and ctx.cookies:
            # Cookies the response hooks saw are in its headers already.
            have = resp.headers.getall("Set-Cookie", ())
            for c in ctx.cookies:
                if c not in have:
                    resp.headers.add("Set-Cookie", c)
        return resp

    async def _answer(self, ctx: RequestContext, table: RouteTable) -> web.StreamResponse:
        request, route = ctx.request, ctx.route
        if route.session != "none":
            early = await self.resolver.resolve(ctx)
            if early is not None:
                return early
        # Skipped without plugins on the route: each await of a hook chain costs a
        # coroutine on every request.
        if self.chain.route(route).plugins:
            ok, answer = await self.chain.request(ctx)
            if not ok:
                return unavailable()
            if answer is not None:
                return await self._answer_directly(ctx, answer)

        if route.websocket and is_websocket(request):
            try:
                # Held for the socket's life: a client's open WebSockets count
                # against its upstream connections like anything else.
                with self.holds.hold(bucket(ctx.client_address)):
                    return await proxy_websocket(self, ctx, table)
            except TooMany:
                self._refused(request, 429, "too many upstream connections from this client")
                return text_response(
                    429, "too many concurrent requests from this address", {"Retry-After": "1"}
                )

        upstream = table.upstreams[route.upstream]
        headers = self.outbound.build(ctx)
        try:
            body = await self._request_body(request, headers) if request.body_exists else None
            with self.holds.hold(bucket(ctx.client_address)):
                upstream_resp = await upstream.send(
                    request.method,
                    ctx.target,
                    headers,
                    body,
                    body_started=body.is_started if isinstance(body, RequestBody) else None,
                )
                ctx.upstream_server = upstream_resp.server
                try:
                    return await self._respond(ctx, upstream_resp)
                finally:
                    upstream_resp.release()
        except UpstreamFailure as f:
            return text_response(f.status, f.message, f.headers)
        except ClientBodyError as e:
            return await self._body_refused(ctx, e)
        except TooMany:
            self._refused(request, 429, "too many upstream connections from this client")
            return text_response(
                429, "too many concurrent requests from this address", {"Retry-After": "1"}
            )

    async def _request_body(
        self, request: web.Request, headers: CIMultiDict[str]
    ) -> bytes | RequestBody | None:
        """The body to send upstream (there is one): whole when small (read before any
        upstream connection is taken), else a stream; its length is the gateway's own."""
        body = RequestBody(request, self.limits)
        data = await body.buffer(self.limits.buffer_body_bytes)
        if data is not None:
            return data
        if body.length is not None:
            headers["Content-Length"] = str(body.length)
        return body

    async def _body_refused(self, ctx: RequestContext, e: ClientBodyError) -> web.StreamResponse:
        request = ctx.request
        self._refused(request, e.status, e.reason)
        text = f"bad request: {e.reason}" if e.status == 400 else e.reason
        resp = text_response(e.status, text)
        for c in ctx.cookies:
            resp.headers.add("Set-Cookie", c)
        # The rest of that body is not worth waiting for.
        resp.force_close()
        if e.status != 413:
            # A client that stopped sending, or whose framing cannot be trusted, gets its
            # answer and the connection is closed at once (aiohttp would otherwise
            # linger, reading what it takes for the rest of the body, for up to 10 s). A
            # 413 lingers, so that a client still sending sees it.
            await resp.prepare(request)
            await resp.write_eof()
            if request.transport is not None:
                request.transport.close()
        return resp

    # -- back towards the client ---------------------------------------------------------

    async def _respond(
        self, ctx: RequestContext, upstream_resp: UpstreamResponse
    ) -> web.StreamResponse:
        request = ctx.request
        try:
            values = self.instructions.collect(ctx, upstream_resp.headers)
            if values:
                await self.instructions.apply(ctx, values)
        except RedisUnavailable:
            return unavailable("session store unavailable; try again")
        except TooManyGuests:
            self._refused(request, 429, "guest sessions per address (limits.guests_per_address)")
            return text_response(
                429, "too many new sessions from this address; try again later",
                {"Retry-After": "60"},
            )
        headers = strip_headers(upstream_resp.headers)
        cookie_name = self.sessions.cookie.name
        backend_cookies = headers.getall("Set-Cookie", ())
        if any(set_cookie_name(v) == cookie_name for v in backend_cookies):
            # The gateway owns this cookie; a backend must not overwrite the token.
            headers.popall("Set-Cookie")
            for v in backend_cookies:
                if set_cookie_name(v) != cookie_name:
                    headers.add("Set-Cookie", v)
            dropped("set-cookie", "gateway-cookie")
        for c in ctx.cookies:
            headers.add("Set-Cookie", c)
        headers["X-Request-Id"] = ctx.request_id
        head = ResponseHead(upstream_resp.status, headers, from_upstream=True)
        if self.chain.route(ctx.route).plugins and not await self.chain.response(ctx, head):
            return unavailable()
        self.record_activity(ctx, head.status)
        length = upstream_resp.content_length
        if (
            length is not None
            and length <= SMALL_BODY
            and request.method != "HEAD"
            and head.status not in (204, 304)
        ):
            return await self._respond_small(ctx, upstream_resp, head)
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
            self.chain.complete(ctx)
            return resp
        if ctx.body_tap is not None:
            ctx.body_tap(None)
        self.chain.complete(ctx)
        return resp

    async def _respond_small(
        self, ctx: RequestContext, upstream_resp: UpstreamResponse, head: ResponseHead
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
            # must still reach the client (ctx.cookies), or the new session is lost.
            return text_response(502, "bad gateway: incomplete upstream response")
        resp = web.Response(
            status=head.status, reason=upstream_resp.reason, body=body, headers=head.headers
        )
        if ctx.body_tap is not None:
            ctx.body_tap(body)
            ctx.body_tap(None)
        # send_timeout bounds the write (it waits only if the client stops reading) by a
        # plain timer that cuts the connection: asyncio.timeout() here cost three getpid()
        # syscalls (Python 3.11's running-loop check) on every page.
        deadline = self._loop.time() + self.limits.send_timeout
        timer = self._loop.call_at(deadline, _cut_slow_reader, ctx.request)
        try:
            await resp.prepare(ctx.request)
            await resp.write_eof()
        except ConnectionError:
            if self._loop.time() < deadline:
                raise  # the client left (logged as such by _handle), not cut by us
        finally:
            timer.cancel()
        self.chain.complete(ctx)
        return resp

    async def _answer_directly(
        self, ctx: RequestContext, answer: web.StreamResponse
    ) -> web.StreamResponse:
        if not answer.prepared:
            for c in ctx.cookies:
                answer.headers.add("Set-Cookie", c)
            head = ResponseHead(answer.status, CIMultiDict(answer.headers), from_upstream=False)
            if not await self.chain.response(ctx, head):
                return unavailable()
            answer.set_status(head.status)
            answer.headers.clear()
            answer.headers.update(head.headers)
        self.record_activity(ctx, answer.status)
        self.chain.complete(ctx)
        return answer

    def record_activity(self, ctx: RequestContext, status: int) -> None:
        """This request's activity, if it has any (activity.* rules, sessions/pageviews.py),
        recorded behind: the backend saw the session as it was before the request."""
        s = ctx.session
        # A login wrote the new session's activity fields itself: this request belongs
        # to the session it replaced.
        if s is None or not ctx.redis_ok or ctx.logged_in:
            return
        kind = self.pageviews.classify(ctx.request.method, ctx.path, status)
        if kind is None:
            return
        key = self.sessions.keys.session(s.key_id)
        if kind == "touch":
            self.sessions.activity.touch(key, s.deadline)
            return
        # The canonical path is visible ASCII (the decoded one may hold lone surrogates
        # that would break the activity flush for every other session).
        self.sessions.activity.record(key, ctx.path[:MAX_PAGE], s.deadline)
