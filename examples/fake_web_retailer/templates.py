"""HTML pages as plain functions. Every value goes through ``e()`` (html.escape)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from html import escape
from urllib.parse import quote

from .catalog import Cart, Product
from .sessions import ShopSession

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:56rem;margin:0 auto;padding:0 1rem;color:#222}
header{display:flex;gap:1rem;align-items:center;border-bottom:1px solid #ddd;padding:.5rem 0}
header .spacer{flex:1} header form{display:inline;margin:0}
table{border-collapse:collapse} td,th{border-bottom:1px solid #eee;padding:.3rem .6rem;
text-align:left} .price{text-align:right} .error{color:#b00020} .muted{color:#777}
ul.products{list-style:none;padding:0;display:grid;grid-template-columns:repeat(auto-fill,
minmax(12rem,1fr));gap:1rem} ul.products li{border:1px solid #eee;padding:.6rem}
"""


def e(value: object) -> str:
    return escape(str(value), quote=True)


def money(amount: Decimal) -> str:
    return f"${amount.quantize(Decimal('0.01')):,}"


def _shell(title: str, body: str, nav: str, who: str, mode: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · Fake Web Retailer</title><style>{_STYLE}</style></head>
<body><header><strong><a href="/">Fake Web Retailer</a></strong>
<a href="/products">Products</a>{nav}
<span class="spacer"></span><span class="muted">{e(mode)} mode</span>{who}</header>
<main><h1>{e(title)}</h1>
{body}
</main></body></html>"""


def layout(title: str, body: str, session: ShopSession, mode: str) -> str:
    """The personalised layout (cart count, username): such pages are private."""
    cart = session.cart
    cart_label = f"Cart ({cart.total_items})" if cart.known else "Cart"
    if session.authenticated:
        who = (
            f'<a href="/account">{e(session.username or "account")}</a>'
            '<form method="post" action="/logout"><button>Log out</button></form>'
        )
    else:
        who = '<a href="/login">Log in</a>'
    return _shell(title, body, f'<a href="/cart">{e(cart_label)}</a>', who, mode)


def neutral_layout(title: str, body: str, mode: str) -> str:
    """The same for every visitor (no username, no cart count): for shared-cacheable
    pages. "Account" leads to the login form when nobody is logged in."""
    return _shell(title, body, '<a href="/cart">Cart</a>', '<a href="/account">Account</a>', mode)


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


def account_page(session: ShopSession, mode: str) -> str:
    rows = "".join(
        f"<tr><th>{e(name)}</th><td>{e(value)}</td></tr>"
        for name, value in sorted(session.fields.items())
    )
    source = (
        "X-Session-* request headers from the gateway" if mode == "gateway"
        else "the shop's own sessions table"
    )
    return f"""<p>Logged in as <strong id="username">{e(session.username)}</strong>.</p>
<h2>Session fields</h2><p class="muted">From {e(source)}.</p>
<table id="session-fields"><tr><th>session id</th><td>{e(session.session_id or "")}</td></tr>
<tr><th>authenticated</th><td>{e(str(session.authenticated).lower())}</td></tr>{rows}</table>
<form method="post" action="/logout"><input type="hidden" name="scope" value="all">
<button>Log out everywhere</button></form>"""


def not_found(what: str) -> str:
    return f'<p>{e(what)} was not found.</p><p><a href="/products">All products</a></p>'
