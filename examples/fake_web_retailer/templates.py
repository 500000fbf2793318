"""HTML pages as plain functions. Every value goes through ``e()`` (html.escape)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from html import escape
from urllib.parse import quote

from .catalog import Cart, Product
from .flash import LastAction
from .inspector import RedisView, ago, clock
from .sessions import ShopSession

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:56rem;margin:0 auto;padding:0 1rem;color:#222}
header{display:flex;gap:1rem;align-items:center;border-bottom:1px solid #ddd;padding:.5rem 0}
header .spacer{flex:1} header form{display:inline;margin:0}
table{border-collapse:collapse} td,th{border-bottom:1px solid #eee;padding:.3rem .6rem;
text-align:left} .price{text-align:right} .error{color:#b00020} .muted{color:#777}
ul.products{list-style:none;padding:0;display:grid;grid-template-columns:repeat(auto-fill,
minmax(12rem,1fr));gap:1rem} ul.products li{border:1px solid #eee;padding:.6rem}
.flash{background:#e8f4ea;border:1px solid #9ccfa6;padding:.5rem .8rem;margin:.8rem 0}
.notice{background:#fff6dd;border:1px solid #e6c86e;padding:.5rem .8rem;margin:.8rem 0}
code,.mono{font-family:ui-monospace,monospace;font-size:.85rem;word-break:break-all}
section{margin:1.2rem 0} .big{font-size:1.4rem} .ok{color:#137333} .warn{color:#a15c00}
"""


def e(value: object) -> str:
    return escape(str(value), quote=True)


def money(amount: Decimal) -> str:
    return f"${amount.quantize(Decimal('0.01')):,}"


def _shell(title: str, body: str, nav: str, who: str, mode: str, messages: str = "") -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · Fake Web Retailer</title><style>{_STYLE}</style></head>
<body><header><strong><a href="/">Fake Web Retailer</a></strong>
<a href="/products">Products</a>{nav}<a href="/inspector" id="inspector-link">Inspector</a>
<span class="spacer"></span><span class="muted">{e(mode)} mode</span>{who}</header>
<main>{messages}<h1>{e(title)}</h1>
{body}
</main></body></html>"""


def merge_notice(value: str | None) -> str | None:
    """The gateway's ``X-Session-Cart-Merged`` report, as a sentence."""
    report = {}
    for part in (value or "").split(";"):
        k, _, v = part.strip().partition("=")
        if v.isdigit():
            report[k] = int(v)
    saved, guest = report.get("saved_items", 0), report.get("guest_items", 0)
    if not saved:
        return None
    items = f"{saved} item{'s' if saved != 1 else ''}"
    text = (
        f"{items} from your earlier visit {'were' if saved != 1 else 'was'} added to your cart."
        if guest
        else f"Your cart still holds {items} from your earlier visit."
    )
    if report.get("dropped"):
        text += f" {report['dropped']} could not be added: your cart is full."
    return text


def layout(
    title: str, body: str, session: ShopSession, mode: str, flash: str | None = None
) -> str:
    """The personalised layout (cart count, username, messages): such pages are private."""
    cart = session.cart
    cart_label = f"Cart ({cart.total_items})" if cart.known else "Cart"
    if session.authenticated:
        who = (
            f'<a href="/account" id="who">{e(session.username or "account")}</a>'
            '<form method="post" action="/logout"><button>Log out</button></form>'
        )
    else:
        who = '<a href="/login" id="who">Log in</a>'
    messages = f'<p class="flash" id="flash" role="status">{e(flash)}</p>' if flash else ""
    notice = merge_notice(session.fields.get("cart_merged"))
    if notice:
        messages += f'<p class="notice" id="merge-notice" role="status">{e(notice)}</p>'
    return _shell(title, body, f'<a href="/cart">{e(cart_label)}</a>', who, mode, messages)


def neutral_layout(title: str, body: str, mode: str) -> str:
    """The same for every visitor (no username, no cart count): for shared-cacheable
    pages. "Account" leads to the login form when nobody is logged in."""
    return _shell(title, body, '<a href="/cart">Cart</a>', '<a href="/account">Account</a>', mode)


def error_page(status: int, reason: str) -> str:
    hint = {
        404: "There is no page at this address.",
        405: "This page cannot be used that way (wrong method).",
    }.get(status, "Something went wrong.")
    return (
        f'<p id="error-status" class="big">{e(status)} · {e(reason)}</p><p>{e(hint)}</p>'
        '<p><a href="/">Home</a> · <a href="/products">All products</a></p>'
    )


def _product_item(p: Product) -> str:
    return (
        f'<li><a href="/products/{e(quote(p.sku))}">{e(p.name)}</a>'
        f'<div class="muted">{e(p.category)}</div><div>{e(money(p.price))}</div></li>'
    )


def home(featured: tuple[Product, ...], session: ShopSession) -> str:
    greeting = (
        f"Welcome back, {e(session.username)}." if session.authenticated
        else "Welcome, guest. Browse, fill a cart, and log in when you are ready."
    )
    items = "".join(_product_item(p) for p in featured)
    return f'<p>{greeting}</p><h2>Featured</h2><ul class="products">{items}</ul>'


def product_list(products: tuple[Product, ...]) -> str:
    return f'<ul class="products">{"".join(_product_item(p) for p in products)}</ul>'


def product_page(p: Product) -> str:
    return f"""<p class="muted">{e(p.category)} · SKU {e(p.sku)}</p>
<p>{e(p.description)}</p><p><strong>{e(money(p.price))}</strong></p>
<form method="post" action="/cart/add">
<input type="hidden" name="sku" value="{e(p.sku)}">
<label>Quantity <input type="number" name="qty" value="1" min="1" max="99"></label>
<button>Add to cart</button></form>"""


def cart_page(cart: Cart, catalog: Mapping[str, Product]) -> str:
    if not cart.known:
        return (
            "<p>Your cart is empty.</p><p class=\"muted\">(No cart information reached "
            "the shop: is the gateway's cart plugin enabled?)</p>"
        )
    if cart.total_items == 0:
        return "<p>Your cart is empty.</p>"
    summary = (
        f'<p id="cart-summary">{e(cart.total_items)} item(s), '
        f"total <strong>{e(money(cart.total_value))}</strong></p>"
    )
    if not cart.lines:  # only totals were sent
        return summary
    rows = []
    for line in cart.lines:
        product = catalog.get(line.sku)
        name = product.name if product else line.sku
        rows.append(
            f"<tr><td>{e(name)}</td><td>{e(line.qty)}</td>"
            f'<td class="price">{e(money(line.unit_price))}</td>'
            f'<td class="price">{e(money(line.subtotal))}</td>'
            f'<td><form method="post" action="/cart/remove">'
            f'<input type="hidden" name="sku" value="{e(line.sku)}">'
            f"<button>Remove</button></form></td></tr>"
        )
    return (
        "<table><tr><th>Item</th><th>Qty</th><th>Price</th><th>Subtotal</th><th></th></tr>"
        + "".join(rows)
        + "</table>"
        + summary
        + '<form method="post" action="/cart/clear"><button>Empty the cart</button></form>'
    )


def login_page(next_path: str, error: str | None = None, username: str = "") -> str:
    message = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
    return f"""{message}<form method="post" action="/login">
<input type="hidden" name="next" value="{e(next_path)}">
<p><label>Username <input name="username" value="{e(username)}" autocomplete="username"
 required></label></p>
<p><label>Password <input type="password" name="password" autocomplete="current-password"
 required></label></p>
<p><button>Log in</button></p></form>
<p class="muted">Demo users: alice / alice-password, bob / bob-password.</p>"""


_TIME_FIELDS = frozenset({"login_time", "last_activity"})


def when(value: str) -> str:
    """An epoch time as a person reads it: "12 s ago (14:02:03 UTC)"."""
    readable = ago(value)
    return f"{readable} ({clock(value)})" if readable else value


def cart_table(cart: Cart, catalog: Mapping[str, Product], table_id: str) -> str:
    if not cart.known:
        return '<p class="muted">No cart information reached the shop.</p>'
    if not cart.lines:
        return f'<p id="{table_id}">{e(cart.total_items)} item(s), {e(money(cart.total_value))}</p>'
    rows = "".join(
        f"<tr><td>{e(catalog[ln.sku].name if ln.sku in catalog else ln.sku)}</td>"
        f'<td>{e(ln.qty)}</td><td class="price">{e(money(ln.unit_price))}</td></tr>'
        for ln in cart.lines
    )
    return (
        f'<table id="{table_id}"><tr><th>Item</th><th>Qty</th><th>Price</th></tr>{rows}'
        f"<tr><th>Total</th><th>{e(cart.total_items)}</th>"
        f'<th class="price">{e(money(cart.total_value))}</th></tr></table>'
    )


def account_page(session: ShopSession, mode: str, catalog: Mapping[str, Product]) -> str:
    shown = {
        k: v for k, v in session.fields.items() if not k.startswith(("cart_", "page_cache"))
    }
    rows = "".join(
        f'<tr id="field-{e(name)}"><th>{e(name)}</th>'
        f"<td>{e(when(value) if name in _TIME_FIELDS else value)}</td></tr>"
        for name, value in sorted(shown.items())
    )
    source = (
        "X-Session-* request headers from the gateway, as they stood before this request"
        if mode == "gateway"
        else "the shop's own sessions table"
    )
    return f"""<p>Logged in as <strong id="username">{e(session.username)}</strong>.</p>
<h2>Session fields</h2><p class="muted">From {e(source)}.</p>
<table id="session-fields">
<tr><th>session id</th><td class="mono">{e(session.session_id or "")}</td></tr>
<tr><th>authenticated</th><td>{e(str(session.authenticated).lower())}</td></tr>{rows}</table>
<h2>Cart</h2>{cart_table(session.cart, catalog, "account-cart")}
<form method="post" action="/logout"><input type="hidden" name="scope" value="all">
<button>Log out everywhere</button></form>"""


def _ttl(seconds: int) -> str:
    if seconds < 0:
        return "no expiry" if seconds == -1 else "gone"
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        minutes = seconds % 3600 // 60
        return f"{seconds // 3600} h {minutes} min" if minutes else f"{seconds // 3600} h"
    return f"{round(seconds / 86400)} days"


def _kv_table(pairs: list[tuple[str, str]], table_id: str, empty: str) -> str:
    if not pairs:
        return f'<p id="{table_id}" class="muted">{e(empty)}</p>'
    rows = "".join(
        f'<tr><th class="mono">{e(k)}</th><td class="mono">{e(v)}</td></tr>' for k, v in pairs
    )
    return f'<table id="{table_id}">{rows}</table>'


def _page_cache_line(report: dict[str, str]) -> str:
    if not report:
        return (
            "No product page viewed in this session yet (or the gateway's page cache "
            "does not report)."
        )
    where = f"{report.get('path', '?')}, viewed {ago(report.get('at'))}"
    outcome = report.get("outcome", "")
    if outcome == "hit":
        return (
            f"HIT: your last product page ({where}) came from the gateway's page cache, "
            f"stored {report.get('age', '?')} s before; the shop did not render it."
        )
    if outcome == "miss":
        return f"MISS: your last product page ({where}) was rendered by the shop."
    why = {
        "bypass-logged-in": "you are logged in, and pages for you are never shared",
        "bypass-not-top": "that product is not among the most viewed, the only ones cached",
    }.get(outcome, outcome)
    return f"Not cached: your last product page ({where}) went to the shop: {why}."


def inspector_page(
    received: dict[str, str],
    action: LastAction | None,
    keys: RedisView | None,
    page_cache: dict[str, str],
    writes: int,
    rows: int,
    mode: str,
) -> str:
    received_rows = [
        (name, f"{value}  ({ago(value)})" if name.endswith(("-Time", "-Activity")) else value)
        for name, value in sorted(received.items())
    ]
    if action is None:
        last = (
            '<p id="last-action" class="muted">No action yet (adding to the cart, logging '
            "in or out are actions).</p>"
        )
    else:
        sent = _kv_table(
            list(action.instructions), "instructions-sent",
            "No X-Session-* instruction: nothing for the gateway to store.",
        )  # fmt: skip
        last = (
            f'<p id="last-action"><code>{e(action.method)} {e(action.path)}</code> answered '
            f"{e(action.status)}, {e(ago(action.at))}, with these instructions for the "
            f"gateway (it applied them and took them off the answer):</p>{sent}"
        )
    if keys is None:
        redis_part = (
            '<p id="redis-keys" class="muted">Not shown: the shop was started without a '
            "view of Redis (<code>make demo</code> gives it one).</p>"
        )
    elif keys.error:
        redis_part = f'<p id="redis-keys" class="error">Redis did not answer: {e(keys.error)}</p>'
    elif not keys.keys:
        redis_part = '<p id="redis-keys" class="muted">Nothing in Redis for this session.</p>'
    else:
        krows = []
        for k in keys.keys:
            content = ", ".join(f"{a}={b}" if a and b else a or b for a, b in k.fields)
            if k.more:
                content += f" … and {k.more} more"
            krows.append(
                f'<tr><td class="mono">{e(k.name)}</td><td>{e(k.type)}</td>'
                f'<td>{e(_ttl(k.ttl))}</td><td class="mono">{e(content)}</td></tr>'
            )
        redis_part = (
            '<table id="redis-keys"><tr><th>key</th><th>type</th><th>expires in</th>'
            f"<th>holds</th></tr>{''.join(krows)}</table>"
        )
    no_session = (
        ""
        if "X-Session-Id" in received or mode != "gateway"
        else '<p id="no-session">No session yet: looking around creates none. The first '
        "thing the shop stores for you (a cart) does.</p>"
    )
    writes_class = "ok" if writes == 0 else "warn"
    explain = (
        "gateway mode: sessions live in Redis, and the shop never writes one"
        if mode == "gateway"
        else "legacy mode: every request reads and writes the shop's sessions table"
    )
    return f"""<p class="muted">What the Session Gateway did for this page, as the shop sees it.</p>
<section><h2>Headers this request brought</h2>
<p class="muted">The gateway removed any <code>X-Session-*</code> header the browser sent, then
added these. They describe the session as it stood before this request.</p>
{_kv_table(received_rows, "received", "None.")}{no_session}
</section>
<section><h2>Your last action</h2>{last}</section>
<section><h2>The session in Redis</h2>{redis_part}</section>
<section><h2>Page cache</h2><p id="page-cache">{e(_page_cache_line(page_cache))}</p></section>
<section><h2>Shop database</h2>
<p id="session-writes" class="big {writes_class}">{e(writes)} session writes</p>
<p class="muted">{e(rows)} rows in its sessions table; {e(explain)}.</p></section>"""


def not_found(what: str) -> str:
    return f'<p>{e(what)} was not found.</p><p><a href="/products">All products</a></p>'
