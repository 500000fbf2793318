"""The shopping cart: ``cart:<id>`` changed only by the backend's X-Session-Cart-* headers.

Layout (DESIGN.md, contract)::

    cart:<id>  HASH  item:<sku> -> "<sku>|<qty>|<unit price>"
                     total_items -> "3"          (sum of quantities)
                     total_value -> "1029.97"    (exact, two decimals)

Every change runs as one Lua script that recomputes the totals from the items, so the
totals equal the items after any interleaving of concurrent changes. Money never touches
a float in Python or a fractional number in Lua: prices travel and are summed as integer
cents, which a Lua double holds exactly below 2^53 (the script refuses a cart whose total
would pass ``MAX_TOTAL_CENTS``, far below that).

Login: the old session's cart moves to the new session. With ``persist_user_cart`` an
authenticated session's cart is mirrored into ``user_cart:<user_id>`` on every change,
and that copy is merged in at the next login, so a user finds the cart on a new device.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson
from aiohttp import web
from prometheus_client import Counter
from pydantic import Field

from gateway.headers import parse_params
from gateway.instructions import dropped
from gateway.plugin import Commands, Plugin, PluginConfig, RequestContext
from gateway.sessions import Session

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

# Shared Lua: parse "<sku>|<qty>|<price>" into integer cents (a leading "$", as in the
# case study's sample data, is tolerated on read) and format cents back to "123.45".
_LUA_COMMON = """
local MAX_TOTAL = 1000000000000000
local MAX_QTY = 9999
-- Fields that are not items this script understands (legacy formats such as
-- "1,299.00"): kept, renamed unparsed:<field>, so no data is lost and the totals still
-- equal the items.
local preserved = {}
local function cents_of(p)
  if string.sub(p, 1, 1) == '$' then p = string.sub(p, 2) end
  local i, f = string.match(p, '^(%d+)%.?(%d?%d?)$')
  if not i or #i > 9 then return nil end
  if f == '' then f = '00' elseif #f == 1 then f = f .. '0' end
  return tonumber(i) * 100 + tonumber(f)
end
local function parse(v)
  local sku, q, p = string.match(v, '^([^|]+)|(%d+)|([^|]+)$')
  if not sku then return nil end
  local c = cents_of(p)
  if not c then return nil end
  return sku, tonumber(q), c
end
local function money(c)
  local r = c % 100
  return string.format('%.0f.%02d', (c - r) / 100, r)
end
local function read_fields(all)
  local items, order = {}, {}
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 5) == 'item:' then
      local sku, q, c = parse(all[i + 1])
      if sku then
        items[sku] = {q, c}
        table.insert(order, sku)
      else
        table.insert(preserved, {'unparsed:' .. all[i], all[i + 1]})
      end
    elseif string.sub(all[i], 1, 9) == 'unparsed:' then
      table.insert(preserved, {all[i], all[i + 1]})
    end
  end
  return items, order
end
local function read_items(key)
  return read_fields(redis.call('HGETALL', key))
end
local function write_cart(key, items, order, ttl)
  redis.call('DEL', key)
  local qty, cents, args, seen = 0, 0, {}, {}
  for _, sku in ipairs(order) do
    local it = items[sku]
    if it and it[1] > 0 and not seen[sku] then
      seen[sku] = true
      qty = qty + it[1]
      cents = cents + it[1] * it[2]
      table.insert(args, 'item:' .. sku)
      table.insert(args, sku .. '|' .. it[1] .. '|' .. money(it[2]))
    end
  end
  if #args > 0 then
    table.insert(args, 'total_items')
    table.insert(args, tostring(qty))
    table.insert(args, 'total_value')
    table.insert(args, money(cents))
  end
  for _, kv in ipairs(preserved) do
    table.insert(args, kv[1])
    table.insert(args, kv[2])
  end
  if #args > 0 then
    redis.call('HSET', key, unpack(args))
    redis.call('EXPIRE', key, ttl)
  end
  return qty, cents
end
local function total_of(items)
  local cents = 0
  for _, it in pairs(items) do cents = cents + it[1] * it[2] end
  return cents
end
local function mirror(src, dst, ttl)
  redis.call('DEL', dst)
  local all = redis.call('HGETALL', src)
  if #all > 0 then
    redis.call('HSET', dst, unpack(all))
    redis.call('EXPIRE', dst, ttl)
  end
end
"""

# KEYS[1] = cart, KEYS[2] = its session (the change is skipped when that is gone),
# KEYS[3] = user copy (only for an authenticated session that keeps one, on one node)
# ARGV = ttl, max_items, user_ttl, then per instruction: op, sku, qty, cents
# Returns {total_items, total_value, outcome per instruction}; with user_ttl 0 (a
# cluster, whose copy is written in a step of its own) followed by the cart's fields.
_APPLY = (
    _LUA_COMMON
    + """
local ttl, max_items, user_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 0 then
  -- The session is gone (a login moved its cart, or a logout): an orphan cart under
  -- its id would only hold the item out of the user's sight.
  local out = {'0', '0.00'}
  for i = 4, #ARGV, 4 do table.insert(out, 'no-session') end
  return out
end
local items, order = read_items(KEYS[1])
local n = #order
local outcomes = {}
for i = 4, #ARGV, 4 do
  local op, sku, q, c = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local it = items[sku]
  local outcome = 'applied'
  if op == 'clear' then
    items, order, n = {}, {}, 0
  elseif op == 'remove' then
    if not it then
      outcome = 'not-in-cart'
    elseif q == 0 or it[1] <= q then
      items[sku] = nil
      n = n - 1
    else
      it[1] = it[1] - q
    end
  elseif op == 'add' then
    local old_q, old_c = 0, 0
    if it then old_q, old_c = it[1], it[2] end
    local new_q = math.min(old_q + q, MAX_QTY)
    if not it and n >= max_items then
      outcome = 'cart-full'
    elseif total_of(items) - old_q * old_c + new_q * c > MAX_TOTAL then
      outcome = 'total-too-large'
    else
      if not it then
        table.insert(order, sku)
        n = n + 1
      end
      items[sku] = {new_q, c}
      if new_q < old_q + q then outcome = 'qty-capped' end
    end
  end
  table.insert(outcomes, outcome)
end
local qty, cents = write_cart(KEYS[1], items, order, ttl)
if KEYS[3] then mirror(KEYS[1], KEYS[3], user_ttl) end
local out = {tostring(qty), money(cents)}
for _, o in ipairs(outcomes) do table.insert(out, o) end
if user_ttl == 0 then
  -- The cluster's first step (the user copy is in another slot): the cart's fields
  -- follow the outcomes, for the copy's own step.
  for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do table.insert(out, v) end
end
return out
"""
)

# Merging more items into a cart (``items``, ``order``): quantities of one sku add up
# (capped), the later source's price wins. Shared by the one-node and the cluster merge.
_LUA_ABSORB = """
local dropped = 0
local function absorb_items(items, order, more, more_order, max_items)
  for _, sku in ipairs(more_order) do
    local add, it = more[sku], items[sku]
    local old_q, old_c = 0, 0
    if it then old_q, old_c = it[1], it[2] end
    local new_q = math.min(old_q + add[1], MAX_QTY)
    if (not it and #order >= max_items)
        or total_of(items) - old_q * old_c + new_q * add[2] > MAX_TOTAL then
      dropped = dropped + 1
    else
      if not it then table.insert(order, sku) end
      items[sku] = {new_q, add[2]}
    end
  end
end
"""

# KEYS[1] = new session's cart, KEYS[2] = old session's cart, KEYS[3] = user copy
# ARGV = ttl, max_items, user_ttl, take_old, take_user, keep_user_copy
# User copy first, then the old (guest) cart: the guest's price wins as the more recent
# one. Returns {total_items, dropped items}. All three keys in one script: one node only.
_MERGE = (
    _LUA_COMMON
    + _LUA_ABSORB
    + """
local ttl, max_items, user_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local items, order = read_items(KEYS[1])
local function absorb(key)
  local more, more_order = read_items(key)
  absorb_items(items, order, more, more_order, max_items)
end
if ARGV[5] == '1' then absorb(KEYS[3]) end
if ARGV[4] == '1' then absorb(KEYS[2]) end
local qty = write_cart(KEYS[1], items, order, ttl)
if KEYS[2] ~= KEYS[1] then redis.call('DEL', KEYS[2]) end
if ARGV[6] == '1' then mirror(KEYS[1], KEYS[3], user_ttl) end
return {tostring(qty), dropped}
"""
)

# The cluster's merge step, on the new session's slot alone: KEYS[1] = new session's
# cart; ARGV = ttl, max_items, then the user copy's and the old cart's fields (each a
# JSON array field, value, ...; read in earlier steps). Returns {total_items, dropped
# items, the cart's fields...} (for the user copy's step).
_MERGE_INTO = (
    _LUA_COMMON
    + _LUA_ABSORB
    + """
local ttl, max_items = tonumber(ARGV[1]), tonumber(ARGV[2])
local items, order = read_items(KEYS[1])
for i = 3, 4 do
  local more, more_order = read_fields(cjson.decode(ARGV[i]))
  absorb_items(items, order, more, more_order, max_items)
end
local qty = write_cart(KEYS[1], items, order, ttl)
local out = {tostring(qty), dropped}
for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do table.insert(out, v) end
return out
"""
)


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
    ttl: int = Field(86400, gt=0, description="seconds a cart lives after its last change")
    max_items: int = Field(100, gt=0, le=1000, description="distinct skus per cart")
    persist_user_cart: bool = True
    user_cart_ttl: int = Field(30 * 86400, gt=0)
    contents_header: bool = False
    max_contents_bytes: int = Field(2048, ge=64, le=65536)


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

    async def startup(self) -> None:
        self._apply = self.services.script(_APPLY)
        self._merge = self.services.script(_MERGE)
        self._merge_into = self.services.script(_MERGE_INTO)

    def _key(self, key_id: str) -> str:
        return self.services.keys.of("cart", key_id)

    def _user_key(self, user_id: str) -> str:
        return self.services.keys.of_user("user_cart", user_id)

    # -- towards the backend ------------------------------------------------------------

    def prefetch(self, ctx: RequestContext, key_id: str) -> Commands:
        # The cart rides along with the session lookup: no round trip of its own.
        return (("HGETALL", self._key(key_id)),)

    async def request(self, ctx: RequestContext) -> web.StreamResponse | None:
        s = ctx.session
        if s is None or not ctx.redis_ok:
            return None
        fields: dict[str, str] = {}
        # Nothing prefetched: a guest created by this very request, which has no cart yet.
        pre = ctx.prefetched.get(self.name)
        if pre:
            if isinstance(pre[0], Exception):
                CART_READ_ERRORS.inc()
                log.warning("cart read failed: %s", pre[0])
                return None
            fields = cast(dict[str, str], pre[0])
        h = ctx.session_headers
        h["X-Session-Cart-Items"] = fields.get("total_items", "0")
        h["X-Session-Cart-Total"] = fields.get("total_value", "0.00")
        if self.config.contents_header:
            entries = [f"{sku}|{q}|{p}" for sku, q, p in parse_cart(fields)]
            text, truncated = _bounded(entries, self.config.max_contents_bytes)
            h["X-Session-Cart-Contents"] = text
            if truncated:
                h["X-Session-Cart-Truncated"] = "true"
        return None

    # -- from the backend -----------------------------------------------------------------

    async def instruction(self, ctx: RequestContext, values: dict[str, str]) -> None:
        s = ctx.session
        instructions = parse(values)
        if s is None or not instructions:
            return
        args: list[str | int] = [self.config.ttl, self.config.max_items, self.config.user_cart_ttl]
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
        keys = [self._key(s.key_id), self.services.keys.session(s.key_id)]
        copy = self.config.persist_user_cart and bool(s.user_id)
        if copy and self.services.cluster:
            # The user copy is in the user's slot: the script changes the cart (its
            # session's slot) and hands back its fields, which the next step mirrors.
            # Stopped between the two, the copy is behind the cart until its next change.
            args[2] = 0
        elif copy:
            keys.append(self._user_key(s.user_id or ""))
        async with asyncio.timeout(self.services.redis_timeout):
            res = cast(list[Any], await self._apply(keys=keys, args=args))
            fields = res[2 + len(kinds) :]
            if args[2] == 0 and len(res) > 2 and res[2] != "no-session":
                await self._mirror(s.user_id or "", fields)
        for kind, outcome in zip(kinds, res[2 : 2 + len(kinds)], strict=True):
            CART_INSTRUCTIONS.labels(kind, str(outcome)).inc()
            if outcome != "applied":
                log.warning("cart %s: %s", kind, outcome)

    async def session_rotated(self, old: Session | None, new: Session) -> None:
        uid = new.user_id or ""
        persist = self.config.persist_user_cart and bool(uid)
        # A guest cart (or this user's own, on a re-login) comes along; another user's
        # cart must not: it stays in that user's copy and its session cart is dropped.
        take_old = old is not None and (not old.authenticated or old.user_id == uid)
        # The same user's session cart already contains their copy: adding it again
        # would double every quantity.
        take_user = persist and not (old is not None and old.user_id == uid)
        new_key = self._key(new.key_id)
        old_key = self._key(old.key_id) if old is not None else new_key
        async with asyncio.timeout(self.services.redis_timeout):
            if self.services.cluster:
                res = await self._merge_in_steps(new_key, old_key, uid, take_old, take_user)
            else:
                res = cast(
                    list[Any],
                    await self._merge(
                        keys=[new_key, old_key, self._user_key(uid)],
                        args=[
                            self.config.ttl,
                            self.config.max_items,
                            self.config.user_cart_ttl,
                            int(take_old),
                            int(take_user),
                            int(persist),
                        ],
                    ),
                )
        if int(res[1]):
            CART_INSTRUCTIONS.labels("merge", "cart-full").inc(int(res[1]))
            log.warning("cart merge at login dropped %s items (cart full)", res[1])

    async def _merge_in_steps(
        self, new_key: str, old_key: str, uid: str, take_old: bool, take_user: bool
    ) -> list[Any]:
        """The login's merge in a cluster, where the new cart, the old one and the user
        copy are in three slots: one step per slot, each safe to be the last."""
        redis = self.services.redis
        persist = self.config.persist_user_cart and bool(uid)
        user_key = self._user_key(uid)
        # 1. Read what comes along (the copy, the old cart); nothing has changed yet.
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(user_key if take_user else new_key)
            pipe.hgetall(old_key if take_old and old_key != new_key else new_key)
            copy, old_cart = await pipe.execute()
        if not take_user:
            copy = {}
        if not take_old or old_key == new_key:
            old_cart = {}
        # 2. The new cart (its session's slot) gets both. Stopped after this, the items
        #    are in the new cart, the copy is behind until the cart's next change, and
        #    the old cart stays under a session that is gone (nothing reads it; it
        #    expires after ttl): nothing is lost, nothing counted twice.
        res = cast(
            list[Any],
            await self._merge_into(
                keys=[new_key],
                args=[
                    self.config.ttl,
                    self.config.max_items,
                    orjson.dumps([x for kv in copy.items() for x in kv]),
                    orjson.dumps([x for kv in old_cart.items() for x in kv]),
                ],
            ),
        )
        # 3. The user copy (the user's slot) mirrors the new cart.
        if persist:
            await self._mirror(uid, res[2:])
        # 4. The old cart goes (its slot).
        if old_cart:
            await redis.delete(old_key)
        return res

    async def _mirror(self, user_id: str, fields: list[Any]) -> None:
        """The user copy becomes ``fields`` (field, value, ...): one transaction on the
        user's slot."""
        key = self._user_key(user_id)
        async with self.services.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if fields:
                pipe.hset(key, mapping=dict(zip(fields[::2], fields[1::2], strict=True)))
                pipe.expire(key, self.config.user_cart_ttl)
            await pipe.execute()

    async def sessions_deleted(self, key_ids: list[str]) -> None:
        # The user's copy stays: that is what brings the cart back at the next login.
        # In a cluster redis-py's DEL of several keys goes slot by slot.
        async with asyncio.timeout(self.services.redis_timeout):
            await self.services.redis.delete(*[self._key(k) for k in key_ids])


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
