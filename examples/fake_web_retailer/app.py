"""The aiohttp application: ``make_app(mode, db_url)``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler

from . import templates
from .db import open_database
from .flash import cookies_middleware, take_flash
from .inspector import RedisLens
from .migrating import MigratingSessions
from .sessions import SESSION, GatewaySessions, LegacySessions, SessionStore
from .views import PRIVATE, STATE, ShopState, routes

MODES = ("gateway", "legacy", "migrating")
# No session work for probes: a health check must not create legacy sessions.
_SESSIONLESS = frozenset({"/healthz"})


@web.middleware
async def session_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in _SESSIONLESS:
        return await handler(request)
    store = request.app[STATE].store
    request[SESSION] = await store.load(request)
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # e.g. 404/405 from the router: still a response
        await store.finish(request, exc)
        raise
    await store.finish(request, response)
    return response


@web.middleware
async def error_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The router's 404 and 405 as pages of the shop (with its header), not bare text."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        state = request.app[STATE]
        session = request.get(SESSION)
        title = "Not found" if exc.status == 404 else "Method not allowed"
        body = templates.error_page(exc.status, exc.reason)
        if session is None:
            html = templates.neutral_layout(title, body, state.mode)
        else:
            html = templates.layout(title, body, session, state.mode, take_flash(request))
        response = web.Response(text=html, status=exc.status, content_type="text/html")
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("X-Frame-Options", "DENY")
    # Nothing is cacheable unless its handler says so (only product pages in gateway
    # mode do): a page showing one visitor's session must never reach another.
    response.headers.setdefault("Cache-Control", PRIVATE)
    return response


def make_app(
    mode: str, db_url: str, *, idle_ttl: float = 3600.0, inspect_redis: str | None = None
) -> web.Application:
    """The shop. ``mode``: ``gateway``, ``legacy`` or ``migrating`` (migrating.py);
    ``db_url``: ``sqlite:PATH`` or ``postgresql://…``. The database is opened, created and
    seeded at startup. ``inspect_redis``: a Redis URL the inspector page may read the
    session's keys from (the demo's; read-only, never the shop's sessions)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    db = open_database(db_url)
    store: SessionStore
    if mode == "gateway":
        store = GatewaySessions()
    elif mode == "migrating":
        store = MigratingSessions(db, idle_ttl=idle_ttl)
    else:
        store = LegacySessions(db, idle_ttl=idle_ttl)
    state = ShopState(mode=mode, db=db, store=store)

    app = web.Application(
        middlewares=[security_headers, session_middleware, cookies_middleware, error_pages]
    )
    app[STATE] = state
    app.add_routes(routes)

    async def database(app: web.Application) -> AsyncIterator[None]:
        await db.open()
        try:
            await db.init()
            state.products = await db.load_products()
            state.catalog = {p.sku: p for p in state.products}
            yield
        finally:
            await db.close()

    app.cleanup_ctx.append(database)
    if inspect_redis is not None:
        url = inspect_redis

        async def lens(app: web.Application) -> AsyncIterator[None]:
            state.lens = RedisLens(url)
            try:
                yield
            finally:
                await state.lens.close()

        app.cleanup_ctx.append(lens)
    return app
