"""Request handlers. They read ``request[SESSION]`` and never care which mode runs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from aiohttp import web

from . import templates
from .catalog import Product
from .db import Database
from .flash import flash, last_action, take_flash
from .inspector import RedisLens, parse_params
from .passwords import DUMMY_HASH, verify_password
from .sessions import SESSION, SessionStore, session_headers


@dataclass(slots=True)
class ShopState:
    """Everything the handlers share; filled in by the app's startup."""

    mode: str
    db: Database
    store: SessionStore
    products: tuple[Product, ...] = ()
    catalog: dict[str, Product] = field(default_factory=dict)
    # The inspector's read-only view of Redis (the demo gives one; the shop needs none).
    lens: RedisLens | None = None


STATE = web.AppKey("shop_state", ShopState)
routes = web.RouteTableDef()

# Pages that show session data (the layout's cart count and username, the cart, the
# account) must never be stored by a shared cache: ``private, no-store`` is the default
# for every response (see app.security_headers). Product pages for guests in gateway mode
# are rendered the same for everyone and opt in to shared caching: browsers revalidate
# every time (max-age=0), so every view reaches the gateway and is counted, while the
# gateway's page_cache keeps one copy for 30 s (s-maxage).
PRIVATE = "private, no-store"
PUBLIC_PRODUCT_PAGE = "public, max-age=0, s-maxage=30"


def _state(request: web.Request) -> ShopState:
    return request.app[STATE]


def page(request: web.Request, title: str, body: str, status: int = 200) -> web.Response:
    state = _state(request)
    html = templates.layout(title, body, request[SESSION], state.mode, take_flash(request))
    return web.Response(
        text=html, status=status, content_type="text/html", headers={"Cache-Control": PRIVATE}
    )


def redirect(location: str) -> web.Response:
    # 303: the browser follows a POST with a GET.
    return web.Response(status=303, headers={"Location": location})


def safe_next(value: str | None, default: str = "/account") -> str:
    """Only same-site relative paths: no scheme, no host, no ``//`` or ``\\`` tricks."""
    if not value or len(value) > 2000 or not value.startswith("/"):
        return default
    if value.startswith("//") or "\\" in value:
        return default
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    return value


# -------------------------------------------------------------------- pages
@routes.get("/")
async def index(request: web.Request) -> web.Response:
    body = templates.home(_state(request).products[:4], request[SESSION])
    return page(request, "Home", body)


@routes.get("/products")
async def product_list(request: web.Request) -> web.Response:
    return page(request, "Products", templates.product_list(_state(request).products))


@routes.get("/products/{sku}")
async def product_detail(request: web.Request) -> web.Response:
    state = _state(request)
    product = state.catalog.get(request.match_info["sku"])
    if product is None:
        return page(request, "Not found", templates.not_found("That product"), status=404)
    body = templates.product_page(product)
    if state.mode != "gateway" or request[SESSION].authenticated:
        # Legacy mode is not behind a shared cache and keeps its personalised layout
        # (and may set its session cookie here); a logged-in visitor sees their name
        # (the gateway's page cache never serves or stores their pages): private like
        # every other page.
        return page(request, product.name, body)
    # Nothing from the session goes into this page: the same bytes for every visitor,
    # so the gateway's page cache may serve it to anyone.
    html = templates.neutral_layout(product.name, body, state.mode)
    return web.Response(
        text=html, content_type="text/html", headers={"Cache-Control": PUBLIC_PRODUCT_PAGE}
    )


@routes.get("/cart")
async def cart(request: web.Request) -> web.Response:
    body = templates.cart_page(request[SESSION].cart, _state(request).catalog)
    return page(request, "Your cart", body)


@routes.get("/account")
async def account(request: web.Request) -> web.Response:
    session = request[SESSION]
    if not session.authenticated:
        response = redirect("/login?" + urlencode({"next": "/account"}))
        flash(response, "Log in to see your account.")
        return response
    state = _state(request)
    return page(request, "Your account", templates.account_page(session, state.mode, state.catalog))


@routes.get("/inspector")
async def inspector(request: web.Request) -> web.Response:
    """What the gateway did for this page, as the shop sees it (inspector.py)."""
    state = _state(request)
    session = request[SESSION]
    keys = None
    if state.lens is not None and session.session_id:
        keys = await state.lens.keys_of(session.session_id, session.user_id)
    body = templates.inspector_page(
        received=session_headers(request.headers),
        action=last_action(request),
        keys=keys,
        page_cache=parse_params(session.fields.get("page_cache")),
        writes=state.db.session_writes,
        rows=await state.db.count_sessions(),
        mode=state.mode,
    )
    return page(request, "Inspector", body)


# -------------------------------------------------------------------- cart
@routes.post("/cart/add")
async def cart_add(request: web.Request) -> web.Response:
    form = await request.post()
    product = _state(request).catalog.get(str(form.get("sku", "")))
    if product is None:
        return page(request, "Not found", templates.not_found("That product"), status=404)
    try:
        qty = int(str(form.get("qty", "1")))
    except ValueError:
        qty = 0
    if not 1 <= qty <= 99:
        return page(request, "Bad quantity", "<p>Quantity must be 1 to 99.</p>", status=400)
    response = redirect("/cart")
    # The price comes from the catalogue, never from the form.
    await _state(request).store.cart_add(request, response, product.sku, qty, product.price)
    flash(response, f"Added {qty} × {product.name} to your cart.")  # noqa: RUF001
    return response


@routes.post("/cart/remove")
async def cart_remove(request: web.Request) -> web.Response:
    form = await request.post()
    sku = str(form.get("sku", ""))
    if sku not in _state(request).catalog:
        return page(request, "Not found", templates.not_found("That product"), status=404)
    response = redirect("/cart")
    await _state(request).store.cart_remove(request, response, sku)
    flash(response, f"Removed {_state(request).catalog[sku].name} from your cart.")
    return response


@routes.post("/cart/clear")
async def cart_clear(request: web.Request) -> web.Response:
    response = redirect("/cart")
    await _state(request).store.cart_clear(request, response)
    flash(response, "Your cart is empty now.")
    return response


# ------------------------------------------------------------ login, logout
@routes.get("/login")
async def login_form(request: web.Request) -> web.Response:
    next_path = safe_next(request.query.get("next"))
    return page(request, "Log in", templates.login_page(next_path))


@routes.post("/login")
async def login(request: web.Request) -> web.Response:
    form = await request.post()
    username = str(form.get("username", "")).strip()[:100]
    password = str(form.get("password", ""))[:1000]
    next_path = safe_next(str(form.get("next", "")))
    state = _state(request)
    user = await state.db.get_user(username) if username else None
    # Hash even for an unknown user, so timing does not tell which usernames exist.
    stored = user.password_hash if user else DUMMY_HASH
    valid = await asyncio.to_thread(verify_password, password, stored)
    if user is None or not valid:
        body = templates.login_page(next_path, "Wrong username or password.", username)
        return page(request, "Log in", body, status=401)
    response = redirect(next_path)
    await state.store.login(request, response, user)
    flash(response, f"Welcome, {user.username}. You are logged in.")
    return response


@routes.post("/logout")
async def logout(request: web.Request) -> web.Response:
    form = await request.post()
    response = redirect("/")
    everywhere = form.get("scope") == "all"
    await _state(request).store.logout(request, response, everywhere)
    flash(
        response,
        "You are logged out on every device." if everywhere else "You are logged out.",
    )
    return response


# ----------------------------------------------------------- service routes
@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "mode": _state(request).mode})


@routes.get("/debug/headers")
async def debug_headers(request: web.Request) -> web.Response:
    """What the shop received about the session: for the demo and for debugging."""
    session = request[SESSION]
    cart = session.cart
    return web.json_response(
        headers={"Cache-Control": PRIVATE},
        data={
            "mode": _state(request).mode,
            "headers": session_headers(request.headers),
            "authenticated": session.authenticated,
            "session_id": session.session_id,
            "fields": session.fields,
            "cart": {
                "known": cart.known,
                "total_items": cart.total_items,
                "total_value": str(cart.total_value),
                "lines": [[ln.sku, ln.qty, str(ln.unit_price)] for ln in cart.lines],
            },
        },
    )
