"""``make demo``: the Fake Web Retailer behind the Session Gateway, end to end.

Starts a private Redis (gateway.embedded), the shop in gateway mode (SQLite in a
temporary directory) and ``python -m gateway`` with a generated config, then walks
through a visit as a browser would: browse, add to cart as a guest, log in (the cart is
kept), browse, view the account, log out; then two new guests ask for a popular product
page, the second one served by the page cache. At each step it prints what the shop received
from the gateway and which keys Redis holds.

    python -m examples.fake_web_retailer.demo          # walk, then serve until Ctrl-C
    python -m examples.fake_web_retailer.demo --once   # walk, exit 0 only if all passed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import redis.asyncio as aioredis
import yaml
from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.redis.embedded import EmbeddedRedis, EmbeddedRedisError

from .app import make_app
from .views import STATE

ROOT = Path(__file__).resolve().parents[2]
COOKIE = "sid"
USER, PASSWORD = "alice", "alice-password"
PRODUCT, PRODUCT_NAME, QTY = "laptop-123", "UltraBook 14", 2
OTHER_PRODUCT = "mouse-456"
TOP_REFRESH = 0.5  # seconds between the page cache's reads of the viewed-items ranking
RANKING = "viewed:ranking"


class StepFailed(Exception):
    pass


def check(condition: object, message: str) -> None:
    if not condition:
        raise StepFailed(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def gateway_config(listen_port: int, redis_url: str, shop_url: str) -> dict[str, Any]:
    """The config.yaml the demo gives the gateway (format: DESIGN.md)."""
    return {
        "listen": f"127.0.0.1:{listen_port}",
        "redis": {"url": redis_url},
        "session": {
            # Plain http on localhost: a Secure cookie would not come back.
            "cookie": {"name": COOKIE, "secure": False, "http_only": True, "same_site": "Lax"},
            "idle_ttl": 3600,
            "absolute_ttl": 28800,
        },
        "upstreams": {"shop": {"servers": [shop_url]}},
        "routes": [
            # Probes must not mint guest sessions.
            {"path": "/healthz", "upstream": "shop", "session": "none"},
            {"path": "/login", "upstream": "shop", "session": "optional",
             "instructions": ["login", "set"]},
            {"path": "/", "upstream": "shop", "session": "optional",
             "instructions": ["set", "logout", "cart"], "guest": True},
        ],
        # Order as in docs/plugins.md: page_cache before viewed_items and cart. A hit
        # answers in page_cache's request hook and skips the later request hooks (the
        # cart's HGETALL), which a cached page does not need; response hooks always run,
        # so viewed_items still counts every hit as a view, and the ranking that only_top
        # reads stays right. A rate_limit would go first, so that hits are limited too.
        "plugins": [
            # The shop sends "Cache-Control: public, max-age=30" on product pages only
            # (the TTL comes from it; ttl is the fallback) and "private, no-store" on every
            # page with session data, which the cache refuses. only_top: just the 10 most
            # viewed products (of 20) are cached: the popular pages are where a cache
            # saves the shop work, the long tail would only fill Redis. top_refresh is
            # short here so the walk sees the ranking take effect (default 5 s).
            {"page_cache": {"paths": ["/products/"], "ttl": 30, "only_top": 10,
                            "top_refresh": TOP_REFRESH}},
            {"viewed_items": {"pattern": "/products/{item}", "flush_interval": 0.1}},
            # The contents header lets the cart page list the items, not just the totals.
            {"cart": {"contents_header": True}},
        ],
    }


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


# ------------------------------------------------------------------------ the walk
@dataclass(slots=True)
class Answer:
    status: int
    path: str  # after redirects
    headers: CIMultiDictProxy[str]
    body: str


class Visit:
    """A browser-like client plus the probes that show what happened where."""

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
        """(status, final path, body); checks that no X-Session-* header leaks out."""
        answer = await self.fetch(method, path, **kw)
        return answer.status, answer.path, answer.body

    @contextlib.asynccontextmanager
    async def another_browser(self) -> AsyncIterator[Visit]:
        """A second visitor: its own cookie jar, same gateway and Redis."""
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            yield Visit(self.base, http, self.redis)

    async def views_of(self, item: str, at_least: int, limit: float = 5.0) -> int:
        """Wait until the ranking counts ``at_least`` views of item (they are written
        behind); return the count."""
        deadline = time.monotonic() + limit
        while True:
            score = await self.redis.zscore(RANKING, item)
            views = int(score or 0)
            if views >= at_least or time.monotonic() > deadline:
                return views
            await asyncio.sleep(0.05)

    async def received(self) -> dict[str, Any]:
        """What the shop receives now (its /debug/headers echo), printed."""
        async with self.http.get(self.base + "/debug/headers") as resp:
            check(resp.status == 200, f"/debug/headers answered {resp.status}")
            data: dict[str, Any] = await resp.json()
        print("    shop received:")
        for name, value in sorted(data["headers"].items()):
            print(f"      {name}: {value}")
        return data

    async def keys(self, show: bool = True) -> dict[str, str]:
        """All keys in the (private) Redis, printed with type, TTL and hash content."""
        found: dict[str, str] = {}
        async for key in self.redis.scan_iter(count=100):
            found[str(key)] = str(await self.redis.type(key))  # decode_responses=True
        if show:
            print("    redis keys:" + ("" if found else " (none)"))
            for key in sorted(found)[:30]:
                ttl = await self.redis.ttl(key)
                extra = ""
                if found[key] == "hash":
                    fields = await self.redis.hgetall(key)
                    extra = " " + json.dumps(dict(sorted(fields.items())))
                elif found[key] == "zset":  # viewed:<id> (item -> time), the ranking
                    members = await self.redis.zrevrange(key, 0, 9, withscores=True)
                    extra = " " + json.dumps({m: round(sc, 3) for m, sc in members})
                print(f"      {key} ({found[key]}, ttl {ttl}s){extra}")
        return found


def session_keys(keys: dict[str, str]) -> set[str]:
    return {k for k in keys if "session:" in k and "user_sessions" not in k}


def check_neutral(answer: Answer, who: str) -> None:
    """A product page as the page cache may share it: public, and nothing of anyone's
    session in it (no username, no cart count)."""
    what = f"the product page for {who}"
    check(answer.status == 200 and PRODUCT_NAME in answer.body,
          f"{what} answered {answer.status}")
    cc = answer.headers.get("Cache-Control", "")
    check(cc.startswith("public") and "max-age=30" in cc,
          f"{what} has Cache-Control {cc!r}, expected 'public, max-age=30'")
    check('action="/cart/add"' in answer.body, f"{what} has no add-to-cart form")
    check('<a href="/cart">Cart</a>' in answer.body and "Cart (" not in answer.body,
          f"{what} shows a cart count")
    check(USER not in answer.body and "Log out" not in answer.body,
          f"{what} shows a logged-in user")


async def walk(visit: Visit) -> list[tuple[str, str | None]]:
    """Run the steps in order; stop at the first failure. Return (step, error) pairs."""
    memo: dict[str, Any] = {}

    async def guest_visit() -> None:
        status, _, _ = await visit.request("GET", "/")
        check(status == 200, f"GET / answered {status}")
        # A guest session is created only once the shop stores something for the
        # visitor (the first add to cart): browsing alone writes nothing to Redis.
        check(not visit.cookie(), f"a {COOKIE!r} cookie was set for a visitor who only looked")
        data = await visit.received()
        check(data["authenticated"] is False, "the visitor is reported as authenticated")
        check(not data["session_id"], "an X-Session-Id reached the shop before any session")
        keys = await visit.keys()
        check(not session_keys(keys), f"browsing created session keys: {session_keys(keys)}")

    async def view_product() -> None:
        memo["views"] = int(await visit.redis.zscore(RANKING, PRODUCT) or 0)  # 0 when fresh
        status, _, body = await visit.request("GET", f"/products/{PRODUCT}")
        check(status == 200 and PRODUCT_NAME in body, f"product page answered {status}")
        # viewed_items writes behind: the view reaches Redis within its flush interval.
        views = await visit.views_of(PRODUCT, memo["views"] + 1)
        check(views == memo["views"] + 1,
              f"the ranking counts {views} views of {PRODUCT}, expected {memo['views'] + 1}")
        await visit.keys()

    async def add_to_cart() -> None:
        status, path, body = await visit.request(
            "POST", "/cart/add", data={"sku": PRODUCT, "qty": str(QTY)}
        )
        check(status == 200 and path == "/cart", f"add to cart ended at {path} with {status}")
        check(visit.cookie(), f"no {COOKIE!r} cookie was set when the guest added to the cart")
        check(PRODUCT_NAME in body and f"{QTY} item(s)" in body,
              "the cart page does not show the item (is the cart plugin loaded?)")
        data = await visit.received()
        check(data["session_id"], "no X-Session-Id reached the shop after the guest's cart")
        memo["guest_id"] = data["session_id"]
        check(data["cart"]["total_items"] == QTY,
              f"shop sees {data['cart']['total_items']} cart items, expected {QTY}")
        keys = await visit.keys()
        check(any("cart:" in k for k in keys), "no cart:* key in Redis")

    async def log_in() -> None:
        before_cookie = visit.cookie()
        memo["before_login_keys"] = session_keys(await visit.keys(show=False))
        status, path, body = await visit.request(
            "POST", "/login", data={"username": USER, "password": PASSWORD, "next": "/cart"}
        )
        check(status == 200 and path == "/cart", f"login ended at {path} with {status}")
        after_cookie = visit.cookie()
        check(after_cookie and after_cookie != before_cookie, "login did not rotate the cookie")
        check(PRODUCT_NAME in body and f"{QTY} item(s)" in body, "the cart was lost at login")
        data = await visit.received()
        check(data["authenticated"] is True, "shop does not see an authenticated session")
        check(data["fields"].get("username") == USER,
              f"shop sees username {data['fields'].get('username')!r}")
        check(data["session_id"] != memo["guest_id"], "the session id did not change at login")
        memo["user_id"] = data["session_id"]
        keys = await visit.keys()
        check(not any(memo["guest_id"] in k for k in keys if k.startswith("session:")),
              "the guest's session key is still in Redis after login")
        own = {k for k in session_keys(keys) if memo["user_id"] in k}
        # If the header id and the key differ, the new keys are the ones login made.
        memo["user_keys"] = own or (session_keys(keys) - memo["before_login_keys"])
        check(memo["user_keys"], "no session key for the logged-in user in Redis")

    async def browse_more() -> None:
        for path in ("/products", "/products/mouse-456", "/"):
            status, _, _ = await visit.request("GET", path)
            check(status == 200, f"GET {path} answered {status}")

    async def account() -> None:
        status, path, body = await visit.request("GET", "/account")
        check(status == 200 and path == "/account", f"/account ended at {path} with {status}")
        check(f'<strong id="username">{USER}</strong>' in body, "account page lacks the username")
        await visit.received()

    async def page_cache() -> None:
        # PRODUCT is in the ranking since step 2, so among the top 10 that page_cache
        # caches (only_top); give the gateway time to re-read the ranking.
        await asyncio.sleep(3 * TOP_REFRESH)
        top = await visit.redis.zrevrange(RANKING, 0, 9, withscores=True)
        print(f"    ranking: {', '.join(f'{m} ({int(sc)})' for m, sc in top)}")
        check(PRODUCT in [m for m, _ in top], f"{PRODUCT} is not in the top 10")
        path = f"/products/{PRODUCT}"
        async with visit.another_browser() as first:
            # A guest with a cart: personal data that must not end up in the cache.
            status, where, body = await first.request(
                "POST", "/cart/add", data={"sku": OTHER_PRODUCT, "qty": "1"})
            check(status == 200 and where == "/cart" and "1 item(s)" in body,
                  f"the first guest's add to cart ended at {where} with {status}")
            miss = await first.fetch("GET", path)
            first_cookie = first.cookie()
        async with visit.another_browser() as second:
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
        print("    the cached page holds no username and no cart count")
        # A hit counts as a view too: step 2, the miss and the hit.
        views = await visit.views_of(PRODUCT, memo["views"] + 3)
        check(views == memo["views"] + 3,
              f"the ranking counts {views} views of {PRODUCT}, expected {memo['views'] + 3}")
        keys = await visit.keys()
        stored = [k for k in keys if k.startswith("pagecache:") and ":vary:" not in k]
        check(len(stored) == 1, f"expected one page in the cache, Redis holds {stored}")

    async def log_out() -> None:
        status, path, _ = await visit.request("POST", "/logout")
        check(status == 200 and path == "/", f"logout ended at {path} with {status}")
        deadline = time.monotonic() + 2.0
        while True:  # the write-behind buffer may still touch it for a moment
            left = [k for k in memo["user_keys"] if await visit.redis.exists(k)]
            if not left or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        check(not left, f"logout left the session in Redis: {left}")
        data = await visit.received()
        check(data["authenticated"] is False, "still authenticated after logout")
        await visit.keys()

    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("a visitor opens the home page: no session, no cookie yet", guest_visit),
        (f"the visitor views {PRODUCT}", view_product),
        (f"the visitor adds {QTY} x {PRODUCT_NAME} to the cart: now a guest session",
         add_to_cart),
        (f"log in as {USER}: new cookie, same cart", log_in),
        ("browse some more", browse_more),
        ("the account page shows the username", account),
        ("log out: the session is gone from Redis", log_out),
        (f"two guests ask for {PRODUCT}: the second gets the cached page, with nothing "
         "personal in it", page_cache),
    ]
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


# -------------------------------------------------------------------- orchestration
async def wait_for_gateway(url: str, proc: asyncio.subprocess.Process, log: Path,
                           limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    async with aiohttp.ClientSession() as http:
        while True:
            if proc.returncode is not None:
                raise StepFailed(f"the gateway exited with status {proc.returncode}; "
                                 f"last lines of {log}:\n{tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=1)):
                    return  # any answer: the listener is up
            if time.monotonic() > deadline:
                raise StepFailed(f"the gateway did not answer {url} within {limit:g}s; "
                                 f"last lines of {log}:\n{tail(log)}")
            await asyncio.sleep(0.2)


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), timeout=10)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def run(args: argparse.Namespace, workdir: Path) -> int:
    redis = EmbeddedRedis(workdir / "redis")
    try:
        redis_url = await redis.start()
    except EmbeddedRedisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"redis:   {redis_url} (pid {redis.pid}, data in {redis.data_dir})")

    shop_db = workdir / "shop.sqlite3"
    shop_app = make_app("gateway", f"sqlite:{shop_db}")
    runner = web.AppRunner(shop_app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    shop_port = runner.addresses[0][1]
    shop_url = f"http://127.0.0.1:{shop_port}"
    print(f"shop:    {shop_url} (gateway mode, database {shop_db})")

    gateway_port = args.port or free_port()
    config = workdir / "gateway.yaml"
    # The operations walk (issue 13): two workers, the admin listener and its API.
    from .ops_walk import Ops, ops_config, ops_walk

    admin_port = free_port()
    cfg = {**gateway_config(gateway_port, redis_url, shop_url), **ops_config(admin_port)}
    config.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    log_path = workdir / "gateway.log"
    command = [*shlex.split(args.gateway_cmd), "--config", str(config)]
    log: IO[bytes] = open(log_path, "wb")  # noqa: ASYNC230 - once, at start
    proc = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT,
        # Its own process group: Ctrl-C reaches the demo, which then stops it in order.
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{gateway_port}"
    print(f"gateway: {base} (pid {proc.pid}, config {config}, log {log_path})")

    client = aioredis.from_url(redis_url, decode_responses=True)
    status = 0
    try:
        try:
            await wait_for_gateway(base + "/healthz", proc, log_path)
        except StepFailed as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
        print(f"\nOpen {base}/ in a browser (users: alice/alice-password, bob/bob-password).")
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1 too
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            results = await walk(Visit(base, http, client))
            if not any(err for _, err in results):
                admin = f"http://127.0.0.1:{admin_port}"
                ops = Ops(Visit(base, http, client), admin, cfg["admin"]["token"], config,
                          proc, redis)
                results += await ops_walk(ops)
        steps_db = shop_app[STATE].db
        rows, writes = await steps_db.count_sessions(), steps_db.session_writes
        print(f"\nshop database: {rows} session rows, {writes} session writes")
        failed = [(name, err) for name, err in results if err]
        if rows or writes:
            failed.append(("the shop database saw no session writes", f"{writes} writes"))
        if failed or not results:
            name, err = failed[0] if failed else ("walk", "no steps ran")
            print(f"\nDEMO FAILED at step: {name}: {err}")
            print(f"(gateway log: {log_path})\n{tail(log_path, 10)}")
            status = 1
        else:
            print("\nAll steps passed.")
        if args.once:
            return status
        print(f"\nServing on {base}/ - press Ctrl-C to stop. Admin listener: "
              f"http://127.0.0.1:{admin_port}/metrics, /readyz, /admin/ "
              f"(Authorization: Bearer {cfg['admin']['token']})")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.ensure_future(proc.wait())
        await asyncio.wait([asyncio.ensure_future(stop.wait()), waiter],
                           return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            print(f"the gateway exited with status {proc.returncode}; log:\n{tail(log_path)}")
            return 1
        print("\nstopping ...")
        return status
    finally:
        await client.aclose()
        await stop_process(proc)
        log.close()
        await runner.cleanup()
        await redis.stop()
        print("stopped gateway, shop and redis.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.fake_web_retailer.demo",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--once", action="store_true",
                        help="walk once and exit: 0 if every step passed")
    parser.add_argument("--port", type=int, default=0,
                        help="gateway port (default: a free one)")
    parser.add_argument("--data-dir", type=Path,
                        help="keep Redis, the shop DB, config and logs here (default: a "
                             "temporary directory, removed at exit)")
    parser.add_argument("--gateway-cmd", default=f"{shlex.quote(sys.executable)} -m gateway",
                        help="command that runs the gateway; '--config FILE' is appended "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # progress shows up as it happens
    if args.data_dir:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(run(args, args.data_dir.resolve()))
    with tempfile.TemporaryDirectory(prefix="fwr-demo-") as tmp:
        return asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
