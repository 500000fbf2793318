"""Where the shop's session comes from, one class per mode.

Views never branch on the mode: they read ``request[SESSION]`` and call the store's
``login`` / ``logout`` / ``cart_*`` methods, which either write the shop's own sessions
table (``LegacySessions``) or answer with the gateway's instruction headers
(``GatewaySessions``).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web

from .catalog import Cart, CartLine
from .db import Database, Row, UserRecord

SESSION_HEADER_PREFIX = "x-session-"
LEGACY_COOKIE = "legacy_sid"
# secrets.token_urlsafe(32) is 43 characters of the URL-safe base64 alphabet.
_LEGACY_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclass(slots=True)
class ShopSession:
    authenticated: bool = False
    session_id: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    cart: Cart = field(default_factory=Cart)

    @property
    def user_id(self) -> str | None:
        return self.fields.get("user_id") if self.authenticated else None

    @property
    def username(self) -> str | None:
        return self.fields.get("username") if self.authenticated else None


SESSION = web.RequestKey("session", ShopSession)


def instruction(**values: object) -> str:
    """``k=v; k2=v2`` with every value percent-encoded (the header protocol's format)."""
    return "; ".join(f"{k}={quote(str(v), safe='')}" for k, v in values.items())


class SessionStore(ABC):
    mode: str

    @abstractmethod
    async def load(self, request: web.Request) -> ShopSession: ...

    async def finish(self, request: web.Request, response: web.StreamResponse) -> None:
        """Called on every response of a request that went through ``load``."""
        return None

    @abstractmethod
    async def login(self, request: web.Request, response: web.StreamResponse,
                    user: UserRecord) -> None: ...

    @abstractmethod
    async def logout(self, request: web.Request, response: web.StreamResponse,
                     everywhere: bool) -> None: ...

    @abstractmethod
    async def cart_add(self, request: web.Request, response: web.StreamResponse,
                       sku: str, qty: int, unit_price: Decimal) -> None: ...

    @abstractmethod
    async def cart_remove(self, request: web.Request, response: web.StreamResponse,
                          sku: str) -> None: ...

    @abstractmethod
    async def cart_clear(self, request: web.Request, response: web.StreamResponse) -> None: ...


# --------------------------------------------------------------------------- gateway
def session_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Every ``X-Session-*`` request header, percent-decoded, under its received name."""
    return {
        name: unquote(value)
        for name, value in headers.items()
        if name.lower().startswith(SESSION_HEADER_PREFIX)
    }


def _decimal(value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        number = Decimal(value.strip().lstrip("$"))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def parse_cart_contents(value: str) -> tuple[CartLine, ...]:
    """``sku|qty|unit_price`` entries separated by ``,`` (already percent-decoded).

    Malformed entries are skipped: a display problem must not break the page.
    """
    lines: list[CartLine] = []
    for entry in value.split(","):
        parts = entry.strip().split("|")
        if len(parts) != 3 or not parts[0]:
            continue
        price = _decimal(parts[2])
        try:
            qty = int(parts[1])
        except ValueError:
            continue
        if price is None or qty <= 0:
            continue
        lines.append(CartLine(parts[0], qty, price))
    return tuple(lines)


class GatewaySessions(SessionStore):
    """No session state at all: the gateway owns it and speaks through headers."""

    mode = "gateway"

    async def load(self, request: web.Request) -> ShopSession:
        received = session_headers(request.headers)
        fields: dict[str, str] = {}
        for name, value in received.items():
            fields[name[len(SESSION_HEADER_PREFIX):].lower().replace("-", "_")] = value
        authenticated = fields.pop("authenticated", "false").strip().lower() == "true"
        session_id = fields.pop("id", None)
        return ShopSession(authenticated, session_id, fields, self._cart(fields))

    @staticmethod
    def _cart(fields: Mapping[str, str]) -> Cart:
        contents = fields.get("cart_contents")
        if contents is not None:
            return Cart.from_lines(parse_cart_contents(contents))
        items, total = fields.get("cart_items"), _decimal(fields.get("cart_total"))
        if items is None and total is None:
            return Cart(known=False)
        try:
            count = int(items) if items is not None else 0
        except ValueError:
            count = 0
        return Cart(total_items=count, total_value=total if total is not None else Decimal(0))

    async def login(self, request: web.Request, response: web.StreamResponse,
                    user: UserRecord) -> None:
        response.headers["X-Session-Login"] = instruction(
            user_id=user.user_id, username=user.username, email=user.email
        )

    async def logout(self, request: web.Request, response: web.StreamResponse,
                     everywhere: bool) -> None:
        response.headers["X-Session-Logout"] = "all" if everywhere else "this"

    async def cart_add(self, request: web.Request, response: web.StreamResponse,
                       sku: str, qty: int, unit_price: Decimal) -> None:
        response.headers["X-Session-Cart-Add"] = instruction(sku=sku, qty=qty, price=unit_price)

    async def cart_remove(self, request: web.Request, response: web.StreamResponse,
                          sku: str) -> None:
        response.headers["X-Session-Cart-Remove"] = instruction(sku=sku)

    async def cart_clear(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Session-Cart-Clear"] = "1"


# ---------------------------------------------------------------------------- legacy
_TOKEN = web.RequestKey("legacy_token", str)
_SET_COOKIE = web.RequestKey("legacy_set_cookie", str)
_ROW = web.RequestKey("legacy_row", dict)


class LegacySessions(SessionStore):
    """The "before" world: one row per session in the shop's database.

    Every request costs one SELECT and one UPDATE (or one INSERT for a new visitor),
    which is exactly the write load the case study moved to Redis.
    """

    mode = "legacy"

    def __init__(self, db: Database, idle_ttl: float = 3600.0, secure_cookie: bool = False):
        self.db = db
        self.idle_ttl = idle_ttl
        self.secure_cookie = secure_cookie

    async def load(self, request: web.Request) -> ShopSession:
        now = time.time()
        page = request.path_qs[:500]
        token = request.cookies.get(LEGACY_COOKIE, "")
        row: Row | None = None
        if _LEGACY_TOKEN.fullmatch(token):
            row = await self.db.session_get(token)
            if row is not None and now - float(row["last_activity"]) > self.idle_ttl:
                await self.db.session_delete(token)
                row = None
        if row is None:
            token = secrets.token_urlsafe(32)
            await self.db.session_create(token, now, page)
            row = {"token": token, "user_id": None, "username": None, "email": None,
                   "login_time": None, "created_at": now, "page_views": 1, "cart": "{}"}
            request[_SET_COOKIE] = token
        else:
            await self.db.session_touch(token, now, page)
            row["page_views"] = int(row["page_views"]) + 1
        row["last_activity"] = now
        row["current_page"] = page
        request[_TOKEN] = token
        request[_ROW] = row
        return self._session(row)

    @staticmethod
    def _session(row: Row) -> ShopSession:
        fields = {
            k: str(v)
            for k, v in row.items()
            if k not in ("token", "cart") and v is not None
        }
        # Shown on the account page: an id derived from the token, never the token.
        session_id = hashlib.sha256(str(row["token"]).encode()).hexdigest()[:16]
        return ShopSession(row["user_id"] is not None, session_id, fields,
                           Cart.from_lines(_cart_lines(row["cart"])))

    async def finish(self, request: web.Request, response: web.StreamResponse) -> None:
        token = request.get(_SET_COOKIE)
        if token == "":
            response.del_cookie(LEGACY_COOKIE, path="/")
        elif token is not None:
            response.set_cookie(LEGACY_COOKIE, token, path="/", httponly=True,
                                samesite="Lax", secure=self.secure_cookie)

    async def login(self, request: web.Request, response: web.StreamResponse,
                    user: UserRecord) -> None:
        # A new token on login (session fixation); the guest's cart comes along.
        new_token = secrets.token_urlsafe(32)
        await self.db.session_login(request[_TOKEN], new_token, user, time.time())
        request[_TOKEN] = new_token
        request[_SET_COOKIE] = new_token

    async def logout(self, request: web.Request, response: web.StreamResponse,
                     everywhere: bool) -> None:
        user_id = request[_ROW]["user_id"]
        if everywhere and user_id is not None:
            await self.db.session_delete_user(int(user_id))
        else:
            await self.db.session_delete(request[_TOKEN])
        request[_SET_COOKIE] = ""

    async def _save_cart(self, request: web.Request, cart: dict[str, Any]) -> None:
        cart_json = json.dumps(cart, sort_keys=True)
        request[_ROW]["cart"] = cart_json
        await self.db.session_set_cart(request[_TOKEN], cart_json)

    async def cart_add(self, request: web.Request, response: web.StreamResponse,
                       sku: str, qty: int, unit_price: Decimal) -> None:
        cart = _cart_dict(request[_ROW]["cart"])
        old = cart.get(sku, {}).get("qty", 0)
        cart[sku] = {"qty": int(old) + qty, "price": str(unit_price)}
        await self._save_cart(request, cart)

    async def cart_remove(self, request: web.Request, response: web.StreamResponse,
                          sku: str) -> None:
        cart = _cart_dict(request[_ROW]["cart"])
        if cart.pop(sku, None) is not None:
            await self._save_cart(request, cart)

    async def cart_clear(self, request: web.Request, response: web.StreamResponse) -> None:
        await self._save_cart(request, {})


def _cart_dict(cart_json: str) -> dict[str, Any]:
    try:
        value = json.loads(cart_json or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _cart_lines(cart_json: str) -> tuple[CartLine, ...]:
    lines = []
    for sku, item in sorted(_cart_dict(cart_json).items()):
        price = _decimal(str(item.get("price")))
        if price is not None:
            lines.append(CartLine(sku, int(item.get("qty", 0)), price))
    return tuple(lines)
