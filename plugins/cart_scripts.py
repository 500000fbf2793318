"""The cart's Lua scripts (plugins/cart.py): every change to a cart is one of these, so it
is atomic, and the totals are recomputed from the items each time.

Money never touches a float in Python or a fractional number in Lua: prices travel and
are summed as integer cents, which a Lua double holds exactly below 2^53 (a cart whose
total would pass ``MAX_TOTAL`` is refused, far below that).

Each script touches keys of one hash slot only (a guest's cart and session share the
session's tag, a user's cart has the user's), so they run unchanged on Redis Cluster.
"""

from __future__ import annotations

# Parse "<sku>|<qty>|<price>" into integer cents (a leading "$", as in the case study's
# sample data, is tolerated on read) and format cents back to "123.45".
_COMMON = """
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
-- A cart's fields as HGETALL returns them (name, value, name, value, ...).
local function parse_fields(all, first)
  local items, order = {}, {}
  for i = first, #all, 2 do
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
  return parse_fields(redis.call('HGETALL', key), 1)
end
-- extend: the TTL never shrinks (a user's cart must outlive every session sharing it).
local function write_cart(key, items, order, ttl, extend)
  local left = -2
  if extend then left = redis.call('TTL', key) end
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
    if left > ttl then ttl = left end
    redis.call('EXPIRE', key, ttl)
  end
  return qty, cents
end
local function total_of(items)
  local cents = 0
  for _, it in pairs(items) do cents = cents + it[1] * it[2] end
  return cents
end
"""

# KEYS[1] = the cart; KEYS[2] (a guest's cart only) = its session: the change is skipped
# when that is gone (a login moved the cart, or a logout), since an orphan cart under
# its id would only hold the item out of the user's sight. A user's cart has no such
# check: it outlives any one session, and a change racing a logout is still the user's.
# ARGV = ttl, max_items, extend ("1": keep a longer TTL), then per instruction: op, sku,
# qty, cents. Returns {total_items, total_value, outcome per instruction}.
APPLY = (
    _COMMON
    + """
local ttl, max_items, extend = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 0 then
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
local qty, cents = write_cart(KEYS[1], items, order, ttl, extend)
local out = {tostring(qty), money(cents)}
for _, o in ipairs(outcomes) do table.insert(out, o) end
return out
"""
)

# A login: the guest's cart (its fields, read by the caller from the guest's own slot)
# merged into the user's cart KEYS[1]. Quantities of one sku add up (capped), the
# guest's price wins as the more recent one. The TTL is extended even when nothing is
# merged: the new session shares the cart and must not outlive it.
# ARGV = ttl, max_items, then the guest cart's fields (name, value, ...).
# Returns {quantity the user's cart held before, quantity the guest brought, skus
# dropped (cart full or total too large), quantity after}.
MERGE = (
    _COMMON
    + """
local ttl, max_items = tonumber(ARGV[1]), tonumber(ARGV[2])
local items, order = read_items(KEYS[1])
local saved = 0
for _, sku in ipairs(order) do saved = saved + items[sku][1] end
local more, more_order = parse_fields(ARGV, 3)
local brought, dropped = 0, 0
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
    brought = brought + new_q - old_q
  end
end
local qty = write_cart(KEYS[1], items, order, ttl, true)
return {saved, brought, dropped, qty}
"""
)
