"""The scripted walk of ``make demo``: two browsers through the gateway, with checks at
every step, printing what the shop received and what Redis holds.

It shops as its own user (``walker``), and at the end removes everything it created
(sessions and carts through the shop and the gateway, the shop-wide leftovers such as
ranking counts and cached pages directly), so that a person who opens the demo next
finds it as a newcomer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from multidict import CIMultiDictProxy

COOKIE = "sid"
USER, PASSWORD, USER_ID = "walker", "walker-password", "1900"
PRODUCT, PRODUCT_NAME, QTY = "laptop-123", "UltraBook 14", 2
OTHER_PRODUCT, OTHER_NAME = "mouse-456", "Silent Mouse"
THIRD_PRODUCT = "keyboard-457"
RANKING = "viewed:ranking"
TOP_REFRESH = 0.5  # seconds between the page cache's reads of the ranking (demo.py)


class StepFailed(Exception):
    pass


def check(condition: object, message: str) -> None:
    if not condition:
        raise StepFailed(message)


@dataclass(slots=True)
class Answer:
    status: int
    path: str  # after redirects
    headers: CIMultiDictProxy[str]
    body: str


class Visit:
    """One browser: its own cookie jar, plus the probes that show what happened where."""

    def __init__(self, base: str, http: aiohttp.ClientSession, redis: aioredis.Redis) -> None:
        self.base = base
        self.http = http
        self.redis = redis

    def cookie(self) -> str | None:
        for c in self.http.cookie_jar:
            if c.key == COOKIE and c.value:
                return c.value
        return None

    async def fetch(self, method: str, path: str, **kw: Any) -> Answer:
        """The final answer; checks that no X-Session-* header leaks out."""
        async with self.http.request(method, self.base + path, **kw) as resp:
            body = await resp.text()
            for r in (*resp.history, resp):
                leaked = [h for h in r.headers if h.lower().startswith("x-session-")]
                check(not leaked, f"{method} {path}: X-Session-* headers reached the client: "
                                  f"{leaked}")
            return Answer(resp.status, resp.url.path, resp.headers, body)

    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, str, str]:
        """(status, final path, body)."""
        answer = await self.fetch(method, path, **kw)
        return answer.status, answer.path, answer.body

    async def login(self, next_path: str = "/cart") -> str:
        status, path, body = await self.request(
            "POST", "/login", data={"username": USER, "password": PASSWORD, "next": next_path}
        )
        check(status == 200 and path == next_path, f"login ended at {path} with {status}")
        return body

    @contextlib.asynccontextmanager
    async def another_browser(self) -> AsyncIterator[Visit]:
        """A second visitor: its own cookie jar, same gateway and Redis."""
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            yield Visit(self.base, http, self.redis)

    async def views_of(self, item: str, at_least: int, limit: float = 5.0) -> int:
        """Wait until the ranking counts ``at_least`` views of item (written behind)."""
        deadline = time.monotonic() + limit
        while True:
            views = int(await self.redis.zscore(RANKING, item) or 0)
            if views >= at_least or time.monotonic() > deadline:
                return views
            await asyncio.sleep(0.05)

    async def received(self, show: bool = True) -> dict[str, Any]:
        """What the shop receives now (its /debug/headers echo)."""
        async with self.http.get(self.base + "/debug/headers") as resp:
            check(resp.status == 200, f"/debug/headers answered {resp.status}")
            data: dict[str, Any] = await resp.json()
        if show:
            print("    shop received:")
            for name, value in sorted(data["headers"].items()):
                print(f"      {name}: {value}")
        return data

    async def keys(self, show: bool = True) -> dict[str, str]:
        """All keys in the (private) Redis, printed with type, TTL and content."""
        found: dict[str, str] = {}
        async for key in self.redis.scan_iter(count=100):
            found[str(key)] = str(await self.redis.type(key))
        if show:
            print("    redis keys:" + ("" if found else " (none)"))
            for key in sorted(found)[:30]:
                ttl = await self.redis.ttl(key)
                extra = ""
                if found[key] == "hash":
                    fields = await self.redis.hgetall(key)
                    extra = " " + json.dumps(dict(sorted(fields.items())))
                elif found[key] == "zset":
                    members = await self.redis.zrevrange(key, 0, 9, withscores=True)
                    extra = " " + json.dumps({m: round(sc, 3) for m, sc in members})
                print(f"      {key} ({found[key]}, ttl {ttl}s){extra}")
        return found


async def account_fields(visit: Visit) -> dict[str, str]:
    """The session fields the account page shows, read off the page."""
    status, where, body = await visit.request("GET", "/account")
    check(status == 200 and where == "/account", f"/account ended at {where} with {status}")
    check(f'<strong id="username">{USER}</strong>' in body, "account page lacks the username")
    found = re.findall(r'<tr id="field-([a-z_]+)"><th>[^<]*</th><td>([^<]*)</td>', body)
    return {k: html.unescape(v) for k, v in found}


def personal_keys(keys: dict[str, str]) -> set[str]:
    """Keys about a session or a user (everything the walk must have ended properly)."""
    kinds = ("session:", "cart:", "user_cart:", "user_sessions", "viewed:", "cart_merged:",
             "pagecache_last:")  # fmt: skip
    return {k for k in keys if k.startswith(kinds) and k != RANKING}


def session_keys(keys: dict[str, str]) -> set[str]:
    return {k for k in keys if k.startswith("session:")}


def check_neutral(answer: Answer, who: str) -> None:
    """A product page as the page cache may share it: public, revalidated by browsers,
    and nothing of anyone's session in it."""
    what = f"the product page for {who}"
    check(answer.status == 200 and PRODUCT_NAME in answer.body,
          f"{what} answered {answer.status}")
    cc = answer.headers.get("Cache-Control", "")
    check(cc == "public, max-age=0, s-maxage=30",
          f"{what} has Cache-Control {cc!r}, expected 'public, max-age=0, s-maxage=30'")
    check('action="/cart/add"' in answer.body, f"{what} has no add-to-cart form")
    check('<a href="/cart">Cart</a>' in answer.body and "Cart (" not in answer.body,
          f"{what} shows a cart count")
    check(USER not in answer.body and "Log out" not in answer.body,
          f"{what} shows a logged-in user")


Step = tuple[str, Callable[[], Awaitable[None]]]


async def walk(laptop: Visit) -> list[tuple[str, str | None]]:
    """Run the steps in order; stop at the first failure. Return (step, error) pairs."""
    memo: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        phone = await stack.enter_async_context(laptop.another_browser())
        memo["before"] = set(await laptop.keys(show=False))
        memo["ranking"] = await laptop.redis.zrange(RANKING, 0, -1, withscores=True)
        return await _run_steps(_steps(laptop, phone, memo), laptop, memo)


def _steps(laptop: Visit, phone: Visit, memo: dict[str, Any]) -> list[Step]:
    async def guest_visit() -> None:
        status, _, _ = await laptop.request("GET", "/")
        check(status == 200, f"GET / answered {status}")
        # A guest session is created only once the shop stores something for the
        # visitor (the first add to cart): browsing alone writes nothing to Redis.
        check(not laptop.cookie(), f"a {COOKIE!r} cookie was set for a visitor who only looked")
        data = await laptop.received()
        check(data["authenticated"] is False, "the visitor is reported as authenticated")
        check(not data["session_id"], "an X-Session-Id reached the shop before any session")
        keys = await laptop.keys()
        made = session_keys(keys) - memo["before"]
        check(not made, f"browsing created session keys: {made}")

    async def view_product() -> None:
        memo["views"] = int(await laptop.redis.zscore(RANKING, PRODUCT) or 0)
        status, _, body = await laptop.request("GET", f"/products/{PRODUCT}")
        check(status == 200 and PRODUCT_NAME in body, f"product page answered {status}")
        views = await laptop.views_of(PRODUCT, memo["views"] + 1)
        check(views == memo["views"] + 1,
              f"the ranking counts {views} views of {PRODUCT}, expected {memo['views'] + 1}")

    async def add_to_cart() -> None:
        status, path, body = await laptop.request(
            "POST", "/cart/add", data={"sku": PRODUCT, "qty": str(QTY)}
        )
        check(status == 200 and path == "/cart", f"add to cart ended at {path} with {status}")
        check(laptop.cookie(), f"no {COOKIE!r} cookie was set when the guest added to the cart")
        check(PRODUCT_NAME in body and f"{QTY} item(s)" in body,
              "the cart page does not show the item (is the cart plugin loaded?)")
        data = await laptop.received()
        check(data["session_id"], "no X-Session-Id reached the shop after the guest's cart")
        memo["guest_id"] = data["session_id"]
        check(data["cart"]["total_items"] == QTY,
              f"shop sees {data['cart']['total_items']} cart items, expected {QTY}")
        keys = await laptop.keys()
        check(f"cart:{memo['guest_id']}" in keys, "no cart:<id> key in Redis for the guest")

    async def phone_fills_the_users_cart() -> None:
        await phone.login()
        status, path, body = await phone.request(
            "POST", "/cart/add", data={"sku": OTHER_PRODUCT, "qty": "1"})
        check(status == 200 and path == "/cart" and OTHER_NAME in body,
              f"the phone's add to cart ended at {path} with {status}")
        keys = await phone.keys()
        check(f"user_cart:{USER_ID}" in keys, f"no user_cart:{USER_ID} in Redis")

    async def log_in() -> None:
        before_cookie = laptop.cookie()
        body = await laptop.login()
        after_cookie = laptop.cookie()
        check(after_cookie and after_cookie != before_cookie, "login did not rotate the cookie")
        check(PRODUCT_NAME in body and OTHER_NAME in body and f"{QTY + 1} item(s)" in body,
              "the guest's cart and the user's were not merged at login")
        notice = "1 item from your earlier visit was added to your cart."
        check(notice in body, f"the cart page does not say {notice!r}")
        print(f"    the cart page says: {notice}")
        data = await laptop.received()
        check(data["authenticated"] is True, "shop does not see an authenticated session")
        check(data["fields"].get("username") == USER,
              f"shop sees username {data['fields'].get('username')!r}")
        check(data["session_id"] != memo["guest_id"], "the session id did not change at login")
        keys = await laptop.keys()
        check(f"session:{memo['guest_id']}" not in keys and f"cart:{memo['guest_id']}" not in keys,
              "the guest's session or cart is still in Redis after login")

    async def one_cart_two_devices() -> None:
        status, _, _ = await phone.request(
            "POST", "/cart/add", data={"sku": THIRD_PRODUCT, "qty": "1"})
        check(status == 200, f"the phone's add answered {status}")
        data = await laptop.received(show=False)
        want = QTY + 2
        check(data["cart"]["total_items"] == want,
              f"the laptop sees {data['cart']['total_items']} items, expected {want}")
        print(f"    the phone added a keyboard; the laptop's cart holds {want} items too")

    async def account_moves() -> None:
        for path in ("/products", f"/products/{OTHER_PRODUCT}"):
            status, where, _ = await laptop.request("GET", path)
            check(status == 200 and where == path, f"GET {path} ended at {where} with {status}")
        first = await account_fields(laptop)
        second = await account_fields(laptop)
        print(f"    account page: current_page {first['current_page']}, page_views "
              f"{first['page_views']}; reloaded: {second['current_page']}, "
              f"{second['page_views']} (each the state before that request)")
        check(first["current_page"] == f"/products/{OTHER_PRODUCT}",
              f"current_page is {first['current_page']!r}, expected the product page before")
        check(second["current_page"] == "/account"
              and int(second["page_views"]) == int(first["page_views"]) + 1,
              "the account page's fields did not move with the page")
        check(" ago (" in second["last_activity"], "the account page shows raw epoch times")

    async def inspector() -> None:
        status, _, body = await laptop.request("GET", "/inspector")
        check(status == 200, f"/inspector answered {status}")
        check('<p id="session-writes" class="big ok">0 session writes</p>' in body,
              "the inspector does not show 0 session writes")
        check(f"user_cart:{USER_ID}" in body, "the inspector does not list the user's cart")
        check("X-Session-Login" in body, "the inspector does not show the last instruction")
        print("    /inspector: headers received, last instructions, Redis keys, 0 session writes")

    async def log_out_everywhere() -> None:
        status, path, body = await laptop.request("POST", "/logout", data={"scope": "all"})
        check(status == 200 and path == "/", f"logout ended at {path} with {status}")
        check("You are logged out on every device." in body, "no word after logout everywhere")
        data = await phone.received(show=False)
        check(data["authenticated"] is False, "the phone is still logged in")
        keys = await laptop.keys()
        left = session_keys(keys) - memo["before"]
        check(not left, f"sessions left after logout everywhere: {left}")
        check(f"user_cart:{USER_ID}" in keys, "the user's cart went with the sessions")

    async def page_cache() -> None:
        # PRODUCT is in the ranking since step 2, so among the top 10 that page_cache
        # caches (only_top); give the gateway time to re-read the ranking.
        await asyncio.sleep(3 * TOP_REFRESH)
        path = f"/products/{PRODUCT}"
        async with laptop.another_browser() as first:
            # A guest with a cart: personal data that must not end up in the cache.
            status, where, body = await first.request(
                "POST", "/cart/add", data={"sku": OTHER_PRODUCT, "qty": "1"})
            check(status == 200 and where == "/cart" and "1 item(s)" in body,
                  f"the first guest's add to cart ended at {where} with {status}")
            miss = await first.fetch("GET", path)
            first_cookie = first.cookie()
            # The gateway stores the page behind the answer: wait for it to land, or a
            # busy machine's second visitor would just be another miss.
            for _ in range(100):
                if [k async for k in laptop.redis.scan_iter("pagecache:*") if ":vary:" not in k]:
                    break
                await asyncio.sleep(0.05)
            # It leaves: its session, cart and history go through the gateway.
            await first.request("POST", "/logout")
        async with laptop.another_browser() as second:
            hit = await second.fetch("GET", path)
            second_cookie = second.cookie()
        for who, answer in (("a guest with a cart", miss), ("a new visitor", hit)):
            print(f"    GET {path} as {who}: {answer.status}, "
                  f"X-Cache: {answer.headers.get('X-Cache')}, "
                  f"Cache-Control: {answer.headers.get('Cache-Control')}"
                  + (f", Age: {answer.headers['Age']}" if "Age" in answer.headers else ""))
        check(miss.headers.get("X-Cache") == "MISS",
              f"first request: X-Cache {miss.headers.get('X-Cache')!r}, expected MISS")
        check(hit.headers.get("X-Cache") == "HIT",
              f"second request: X-Cache {hit.headers.get('X-Cache')!r}, expected HIT "
              "(is page_cache enabled, and the product in the top 10?)")
        check_neutral(miss, "a guest with a cart")
        check_neutral(hit, "a new visitor (from the cache)")
        check(hit.body == miss.body, "the cached page differs from the page the shop rendered")
        check(first_cookie and not second_cookie,
              "the cached page set a session cookie for a visitor who only looked "
              "(or the guest with a cart has none)")
        # A hit counts as a view too: step 2, the miss and the hit.
        views = await laptop.views_of(PRODUCT, memo["views"] + 3)
        check(views == memo["views"] + 3,
              f"the ranking counts {views} views of {PRODUCT}, expected {memo['views'] + 3}")
        keys = await laptop.keys()
        stored = [k for k in keys if k.startswith("pagecache:") and ":vary:" not in k]
        check(len(stored) == 1, f"expected one page in the cache, Redis holds {stored}")

    async def clean_up() -> None:
        await clean(laptop, memo)

    return [
        ("a visitor opens the home page: no session, no cookie yet", guest_visit),
        (f"the visitor views {PRODUCT}", view_product),
        (f"the visitor adds {QTY} x {PRODUCT_NAME} to the cart: now a guest session",
         add_to_cart),
        (f"on a phone, {USER} logs in and adds a {OTHER_NAME}: the user's cart",
         phone_fills_the_users_cart),
        (f"the visitor logs in as {USER}: new cookie, the two carts merged, and said so",
         log_in),
        ("the phone adds a keyboard: one cart for both devices", one_cart_two_devices),
        ("browse, then the account page: the fields move with each page", account_moves),
        ("the inspector: what the gateway did, and 0 session writes in the shop", inspector),
        ("log out everywhere: both devices' sessions gone, the cart kept for next time",
         log_out_everywhere),
        (f"two guests ask for {PRODUCT}: the second gets the cached page, with nothing "
         "personal in it", page_cache),
        ("clean up: everything the walk created is gone", clean_up),
    ]


async def clean(visit: Visit, memo: dict[str, Any]) -> None:
    """Remove what the walk created: the user's cart through the shop (log in, empty it,
    log out everywhere), then the shop-wide leftovers no session owns (its ranking counts,
    cached pages, counters) directly; Redis then holds what it held before."""
    await visit.login()
    status, _, _ = await visit.request("POST", "/cart/clear")
    check(status == 200, f"emptying the cart answered {status}")
    await visit.request("POST", "/logout", data={"scope": "all"})
    keys = await visit.keys(show=False)
    left = personal_keys(keys) - memo["before"]
    check(not left, f"sessions or carts the gateway should have ended are left: {left}")
    # Activity and views are written behind: let the last flushes land, then sweep until
    # nothing new appears.
    for _ in range(20):
        await asyncio.sleep(0.25)
        extra = set(await visit.keys(show=False)) - memo["before"]
        if not extra:
            break
        await visit.redis.delete(*extra)
    if memo["ranking"]:
        await visit.redis.delete(RANKING)
        await visit.redis.zadd(RANKING, dict(memo["ranking"]))
    after = set(await visit.keys(show=False))
    check(after == memo["before"], f"Redis differs from before the walk: {after ^ memo['before']}")
    print(f"    Redis holds the {len(after)} keys it held before the walk"
          if after else "    Redis is empty again, as before the walk")


async def _run_steps(
    steps: list[Step], visit: Visit, memo: dict[str, Any]
) -> list[tuple[str, str | None]]:
    results: list[tuple[str, str | None]] = []
    for number, (name, step) in enumerate(steps, start=1):
        print(f"\n[{number}/{len(steps)}] {name}")
        try:
            await step()
        except StepFailed as exc:
            print(f"    FAILED: {exc}")
            results.append((name, str(exc)))
            break
        except (aiohttp.ClientError, aioredis.RedisError, KeyError, ValueError) as exc:
            print(f"    FAILED: {type(exc).__name__}: {exc}")
            results.append((name, f"{type(exc).__name__}: {exc}"))
            break
        print("    ok")
        results.append((name, None))
    # Every step has an entry: the ones after a failure did not run.
    results += [(name, "not run") for name, _ in steps[len(results):]]
    return results
