"""The shopping cart, changed only by the backend's X-Session-Cart-* headers.

Layout (DESIGN.md, contract)::

    cart:<id>  HASH  item:<sku> -> "<sku>|<qty>|<unit price>"
                     total_items -> "3"          (sum of quantities)
                     total_value -> "1029.97"    (exact, two decimals)

One cart per signed-in user: a guest's cart is ``cart:<id>`` (the session's), a signed-in
user's is ``user_cart:<user_id>`` (same layout, in the user's hash slot), shared by all of
that user's sessions and devices. At login the guest's cart is merged into the user's
and deleted, and the session's next request tells the backend what the merge did
(``X-Session-Cart-Merged``). The user's cart lives at least as long as any session of
the user can (``session.absolute_ttl`` after the last login or change), and with
``persist_user_cart`` ``user_cart_ttl`` after its last change, so it is there at the next
login on any device.

Every change runs as one Lua script (plugins/cart_scripts.py) that recomputes the totals
from the items, so the totals equal the items after any interleaving of concurrent
changes, from one session or from all of a user's at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, cast

from aiohttp import web
from prometheus_client import Counter
from pydantic import Field

from gateway.errors import REDIS_FAILURES
from gateway.headers import parse_params
from gateway.instructions import dropped
from gateway.plugin import Commands, Plugin, PluginConfig, RequestContext, Services
from gateway.sessions import Session

from .cart_scripts import APPLY, MERGE

log = logging.getLogger("plugins.cart")

CART_INSTRUCTIONS = Counter(
    "gateway_cart_instructions_total", "Cart instructions by outcome", ["kind", "outcome"]
)
CART_READ_ERRORS = Counter("gateway_cart_read_errors_total", "Cart reads that failed")

SKU_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
PRICE_RE = re.compile(r"([0-9]{1,9})(?:\.([0-9]{1,2}))?")
QTY_RE = re.compile(r"[0-9]{1,4}")
MAX_QTY = 9999
MAX_TOTAL_CENTS = 10**15  # 10 trillion in major units; exact in a double (< 2^53)


@dataclass(slots=True)
class CartInstruction:
    kind: Literal["add", "remove", "clear"]
    params: dict[str, str]


# X-Session-Cart-<Kind>, in the order they are applied: clear, remove, add.
_HEADERS: tuple[tuple[Literal["add", "remove", "clear"], str], ...] = (
    ("clear", "x-session-cart-clear"),
    ("remove", "x-session-cart-remove"),
    ("add", "x-session-cart-add"),
)


def parse(values: dict[str, str]) -> list[CartInstruction]:
    """The backend's cart headers as instructions, in the order they are applied;
    malformed ones are dropped and counted."""
    out: list[CartInstruction] = []
    for kind, header in _HEADERS:
        raw = values.get(header)
        if raw is None:
            continue
        if kind == "clear":
            params: dict[str, str] | None = (
                {"clear": "1"} if raw.strip() in ("1", "true", "yes") else None
            )
        else:
            params = parse_params(raw.strip())
        if params is None:
            dropped(header.removeprefix("x-session-"), "malformed")
        else:
            out.append(CartInstruction(kind, params))
    return out


class CartConfig(PluginConfig):
    ttl: int = Field(86400, gt=0, description="seconds a guest's cart lives after its last change")
    max_items: int = Field(100, gt=0, le=1000, description="distinct skus per cart")
    # A signed-in user's cart is kept user_cart_ttl after its last change (it is there at
    # the next login); false: it ends with the user's sessions (session.absolute_ttl
    # after the last login or change).
    persist_user_cart: bool = True
    user_cart_ttl: int = Field(30 * 86400, gt=0)
    contents_header: bool = False
    max_contents_bytes: int = Field(2048, ge=64, le=65536)


STATE = "cart"
OWNER_MEMO = 10_000  # session key ids whose user this process knows
MERGE_NOTE_TTL = 300  # seconds a merge report waits for the session's next request


def _cents(price: str) -> int | None:
    m = PRICE_RE.fullmatch(price)
    if m is None:
        return None
    return int(m.group(1)) * 100 + int((m.group(2) or "0").ljust(2, "0"))


def _qty(raw: str | None, default: int | None) -> int | None:
    if raw is None:
        return default
    if not QTY_RE.fullmatch(raw):
        return None
    q = int(raw)
    return q if 1 <= q <= MAX_QTY else None


def encode(ins: CartInstruction) -> list[str | int] | None:
    """One instruction as the script's four arguments, or None when it is malformed."""
    p = ins.params
    if ins.kind == "clear":
        return ["clear", "", 0, 0]
    sku = p.get("sku", "")
    if not SKU_RE.fullmatch(sku):
        return None
    if ins.kind == "remove":
        qty = _qty(p.get("qty"), 0)  # 0: remove the line whatever its quantity
        return None if qty is None else ["remove", sku, qty, 0]
    qty = _qty(p.get("qty"), 1)
    cents = _cents(p.get("price", ""))
    if qty is None or cents is None:
        return None
    return ["add", sku, qty, cents]


def parse_cart(fields: dict[str, str]) -> list[tuple[str, str, str]]:
    """(sku, qty, price) of every item, by sku."""
    out = []
    for name, value in fields.items():
        if name.startswith("item:"):
            parts = value.split("|")
            if len(parts) == 3:
                out.append((parts[0], parts[1], parts[2].removeprefix("$")))
    return sorted(out)


class Cart(Plugin):
    name = "cart"
    Config = CartConfig
    fault_policy = "open"

    instructions = {
        "cart": ("X-Session-Cart-Add", "X-Session-Cart-Remove", "X-Session-Cart-Clear")
    }

    config: CartConfig

    def __init__(self, config: CartConfig, services: Services) -> None:
        super().__init__(config, services)
        absolute = services.settings.session.absolute_ttl
        # Never shorter than a session can live: every session of the user shares it.
        kept = config.user_cart_ttl if config.persist_user_cart else 0
        self._user_ttl = max(absolute, kept)
        # Session key id -> user id. A session's user never changes (a login always makes
        # a new session), so an entry is never wrong, only gone: it lets prefetch read a
        # signed-in session's cart (named by the user) with the session lookup.
        self._owner: OrderedDict[str, str] = OrderedDict()

    async def startup(self) -> None:
        self._apply = self.services.script(APPLY)
        self._merge = self.services.script(MERGE)

    # -- key names ------------------------------------------------------------------------

    def _key(self, key_id: str) -> str:
        return self.services.keys.of("cart", key_id)

    def _user_key(self, user_id: str) -> str:
        return self.services.keys.of_user("user_cart", user_id)

    def _note_key(self, key_id: str) -> str:
        return self.services.keys.of("cart_merged", key_id)

    def cart_key(self, session: Session) -> str:
        """The cart this session sees and changes: its user's, or its own (a guest)."""
        uid = session.user_id
        return self._user_key(uid) if uid else self._key(session.key_id)

    def _remember(self, key_id: str, user_id: str) -> None:
        if key_id in self._owner:
            # Least recently used goes first: a busy session keeps its memo.
            self._owner.move_to_end(key_id)
            return
        if len(self._owner) >= OWNER_MEMO:
            self._owner.pop(next(iter(self._owner)))
        self._owner[key_id] = user_id

    # -- towards the backend ------------------------------------------------------------

    def prefetch(self, ctx: RequestContext, key_id: str) -> Commands:
        # The cart and a pending merge report ride along with the session lookup: no
        # round trip of their own, once this process knows whose session it is.
        uid = self._owner.get(key_id)
        key = self._user_key(uid) if uid else self._key(key_id)
        ctx.state[STATE] = key
        return (("HGETALL", key), ("GET", self._note_key(key_id)))

    async def request(self, ctx: RequestContext) -> web.StreamResponse | None:
        s = ctx.session
        if s is None or not ctx.redis_ok:
            return None
        key = self.cart_key(s)
        if s.user_id:
            self._remember(s.key_id, s.user_id)
        fields: dict[str, str] = {}
        note: str | None = None
        pre = ctx.prefetched.get(self.name)
        try:
            if pre and isinstance(pre[0], Exception):
                raise pre[0]
            if pre and ctx.state.get(STATE) == key:
                fields = cast(dict[str, str], pre[0])
            else:
                # Read the wrong cart (a signed-in session this process had not seen),
                # or none at all (a session a plugin source found): read it now.
                async with asyncio.timeout(self.services.redis_timeout):
                    fields = cast(dict[str, str], await self.services.redis.hgetall(key))
            if pre and isinstance(pre[1], str):
                note = await self._take_note(s.key_id, pre[1])
        except REDIS_FAILURES as e:
            CART_READ_ERRORS.inc()
            log.warning("cart read failed: %s: %s", type(e).__name__, e)
            return None
        h = ctx.session_headers
        h["X-Session-Cart-Items"] = fields.get("total_items", "0")
        h["X-Session-Cart-Total"] = fields.get("total_value", "0.00")
        if note is not None:
            h["X-Session-Cart-Merged"] = note
        if self.config.contents_header:
            entries = [f"{sku}|{q}|{p}" for sku, q, p in parse_cart(fields)]
            text, truncated = _bounded(entries, self.config.max_contents_bytes)
            h["X-Session-Cart-Contents"] = text
            if truncated:
                h["X-Session-Cart-Truncated"] = "true"
        return None

    async def _take_note(self, key_id: str, note: str) -> str | None:
        """The merge report, once: only the request that deletes it passes it on."""
        async with asyncio.timeout(self.services.redis_timeout):
            gone = await self.services.redis.delete(self._note_key(key_id))
        return note if gone else None

    # -- from the backend -----------------------------------------------------------------

    async def instruction(self, ctx: RequestContext, values: dict[str, str]) -> None:
        s = ctx.session
        instructions = parse(values)
        if s is None or not instructions:
            return
        if s.user_id:
            keys = [self._user_key(s.user_id)]
            args: list[str | int] = [self._user_ttl, self.config.max_items, 1]
        else:
            keys = [self._key(s.key_id), self.services.keys.session(s.key_id)]
            args = [self.config.ttl, self.config.max_items, 0]
        kinds: list[str] = []
        for ins in instructions:
            enc = encode(ins)
            if enc is None:
                CART_INSTRUCTIONS.labels(ins.kind, "malformed").inc()
                log.warning("cart %s dropped: malformed %r", ins.kind, ins.params)
                continue
            args += enc
            kinds.append(ins.kind)
        if not kinds:
            return
        async with asyncio.timeout(self.services.redis_timeout):
            res = cast(list[Any], await self._apply(keys=keys, args=args))
        for kind, outcome in zip(kinds, res[2:], strict=True):
            CART_INSTRUCTIONS.labels(kind, str(outcome)).inc()
            if outcome != "applied":
                log.warning("cart %s: %s", kind, outcome)

    # -- moving with the session ----------------------------------------------------------

    async def session_rotated(self, old: Session | None, new: Session) -> None:
        uid = new.user_id
        if not uid:
            return
        self._remember(new.key_id, uid)
        # A guest's cart comes along. The same user's old session shares the cart
        # already; another user's cart stays that user's. Either way the old session's
        # own cart:<id> goes with it (a signed-in session has one only from before
        # per-user carts, kept in step with user_cart:<user_id> then).
        old_key = self._key(old.key_id) if old is not None else None
        guest_key = old_key if old is not None and not old.authenticated else None
        timeout = self.services.redis_timeout
        guest: dict[str, str] = {}
        if guest_key is not None:
            # Read in the guest's slot, merged in the user's: one script cannot span both
            # under Redis Cluster. Nothing changes the guest's cart meanwhile: its session
            # is gone (the change script checks for it).
            async with asyncio.timeout(timeout):
                guest = cast(dict[str, str], await self.services.redis.hgetall(guest_key))
        args: list[str | int] = [self._user_ttl, self.config.max_items]
        args += [x for kv in guest.items() for x in kv]
        async with asyncio.timeout(timeout):
            res = cast(list[Any], await self._merge(keys=[self._user_key(uid)], args=args))
        saved, brought, lost, total = (int(x) for x in res)
        if lost:
            CART_INSTRUCTIONS.labels("merge", "cart-full").inc(lost)
            log.warning("cart merge at login dropped %s items (cart full)", lost)
        report = old is None or old.user_id != uid
        async with asyncio.timeout(timeout):
            queued = False
            async with self.services.redis.pipeline(transaction=False) as pipe:
                if old_key is not None:
                    pipe.delete(old_key)
                    queued = True
                if saved and report:
                    # The backend hears of it on the session's next request (a login's
                    # answer is usually a redirect): "2 items from your earlier visit".
                    # No spaces: X-Session-* values are percent-encoded beyond visible ASCII.
                    note = f"saved_items={saved};guest_items={brought};total_items={total}"
                    if lost:
                        note += f";dropped={lost}"
                    pipe.set(self._note_key(new.key_id), note, ex=MERGE_NOTE_TTL)
                    CART_INSTRUCTIONS.labels("merge", "reported").inc()
                    queued = True
                if queued:
                    await pipe.execute()

    async def sessions_deleted(self, key_ids: list[str]) -> None:
        # A user's cart stays: other sessions share it, and the next login brings it back.
        for k in key_ids:
            self._owner.pop(k, None)
        keys = [self._key(k) for k in key_ids] + [self._note_key(k) for k in key_ids]
        async with asyncio.timeout(self.services.redis_timeout):
            await self.services.redis.delete(*keys)


def _bounded(entries: list[str], limit: int) -> tuple[str, bool]:
    """Entries joined by "," up to ``limit`` bytes; True when some were left out."""
    out: list[str] = []
    size = 0
    for e in entries:
        add = len(e.encode()) + (1 if out else 0)
        if size + add > limit:
            return ",".join(out), True
        out.append(e)
        size += add
    return ",".join(out), False
