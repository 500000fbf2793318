"""Which session a request has: first whether a plugin leaves it to the backend
(``bypass_sessions``, a gradual rollout), then the cookie, then the sources in order —
this process's near-cache, Redis (with the plugins' prefetch reads in the same pipeline),
then any plugin source (a read-through from another store) — then the route's policy:
an expired cookie, ``session: required``, ``on_redis_error``.

``resolve`` sets ``ctx.session`` and answers only when the route must not go on: a
required route without a session (401 or the login redirect) or Redis failing where
the route says so (503).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

from aiohttp import web

from .. import metrics
from ..errors import RedisUnavailable, bounded
from ..plugin import RequestContext
from ..responses import text_response, unavailable
from .actions import SessionActions
from .cookies import SessionCookie
from .model import Session, valid_token
from .store import SessionStore

if TYPE_CHECKING:
    from ..chain import Chain

_INVALID = metrics.SESSION_LOOKUPS.labels("invalid")
_ERROR = metrics.SESSION_LOOKUPS.labels("error")


class SessionResolver:
    def __init__(
        self, store: SessionStore, chain: Chain, cookie: SessionCookie, actions: SessionActions
    ) -> None:
        self.store = store
        self.chain = chain
        self.cookie = cookie
        self.actions = actions

    async def resolve(self, ctx: RequestContext) -> web.StreamResponse | None:
        request, route = ctx.request, ctx.route
        # Only optional routes: a required route's backend relies on a live session.
        if route.session == "optional" and self.chain.route(route).bypassers:
            ok, bypass = self.chain.bypass_sessions(ctx)
            if not ok:
                return unavailable()
            if bypass:
                ctx.sessions_bypassed = True
                return None
        values = self.cookie.values(request.headers.getall("Cookie", ()))
        # Two values for our cookie (e.g. one planted on a parent domain) is ambiguous:
        # take neither rather than guess which one the user really holds.
        token = values[0] if len(values) == 1 and valid_token(values[0]) else None
        stale = bool(values)
        if stale and token is None:
            _INVALID.inc()
        try:
            if token is not None:
                ctx.session = await self._from_gateway(ctx, token)
                stale = ctx.session is None
            if ctx.session is None and self.chain.route(route).sources:
                found = await self.chain.find_session(ctx)
                if found is not None:
                    ctx.session = await self.actions.adopt(found)
                    ctx.cookies.append(self.cookie.for_token(ctx.session.token))
                    stale = False
        except RedisUnavailable:
            _ERROR.inc()
            ctx.redis_ok = False
            # SECURITY: a required route's backend never sees a request without a live
            # session, whatever on_redis_error says: a client that can slow Redis down
            # (or just sends a well-formed random cookie while it is failing) must not
            # get through as anonymous.
            if route.on_redis_error == "closed" or route.session == "required":
                return unavailable("session store unavailable")
            return None
        if stale and ctx.session is None and len(values) <= 1:
            ctx.cookies.append(self.cookie.expired)
        if ctx.session is None and route.session == "required":
            return self._unauthenticated(ctx)
        return None

    async def _from_gateway(self, ctx: RequestContext, token: str) -> Session | None:
        """The session of the gateway's own cookie: the near-cache, else Redis; the
        route's plugins' prefetch reads ride along."""
        store = self.store
        key_id = store.keys.key_id(token)
        hit, session = store.cached(token, key_id)
        prefetchers = self.chain.route(ctx.route).prefetchers
        # A near-cache hit on a route without prefetch reads is answered right here,
        # without the coroutines of a Redis call.
        if hit and not prefetchers:
            return session
        commands, spans = self.chain.prefetch(ctx, key_id) if prefetchers else ((), [])
        if hit and not commands:
            # Nor when the route's prefetchers have nothing to read this time (a plugin
            # whose reads are switched off by its options).
            if session is not None and spans:
                self.chain.take_prefetched(ctx, spans, [])
            return session
        if not hit:
            # Within redis.timeout: the batched read enforces it.
            session, results = await bounded(
                "load", store.load(token, key_id, commands), None
            )
        elif session is not None:
            results = await bounded("load", store.prefetch_only(commands), None)
        if session is not None and spans:
            self.chain.take_prefetched(ctx, spans, results)
        return session

    def _unauthenticated(self, ctx: RequestContext) -> web.StreamResponse:
        route = ctx.route
        if route.login_url and ctx.request.method in ("GET", "HEAD"):
            # Only a same-site relative path goes into next: an absolute or
            # scheme-relative URL there would make the login page an open redirect.
            nxt = ctx.target
            if not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:
                nxt = "/"
            sep = "&" if "?" in route.login_url else "?"
            return web.Response(
                status=302,
                headers={"Location": f"{route.login_url}{sep}next={quote(nxt, safe='')}"},
            )
        return text_response(401, "login required")
