"""The demo's operations walk (issue 13), after the shopping walk: the gateway runs two
workers with its admin listener on, and the walk shows

- /metrics: both workers' counters summed, and the session population moving;
- the admin API logging a user out everywhere (the shop's next page sees a guest);
- /readyz turning 503 when Redis is killed and 200 when it is back;
- ``python -m gateway health --comprehensive``, one line per check;
- a SIGHUP with a new route taking effect in every worker while requests keep coming,
  none of them failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.redis.embedded import EmbeddedRedis

from .demo import ROOT
from .walk import PASSWORD, PRODUCT, USER, StepFailed, Visit, check

WORKERS = 2
NEW_ROUTE = "/promo/"


def ops_config(admin_port: int) -> dict[str, Any]:
    """What the operations walk adds to the demo's gateway config."""
    return {
        "workers": WORKERS,
        "admin": {
            "listen": f"127.0.0.1:{admin_port}",
            "token": secrets.token_urlsafe(24),
            # Short for the demo, so the count of sessions follows within a second.
            "population_interval": 0.5,
        },
    }


@dataclass
class Ops:
    visit: Visit
    admin: str  # http://127.0.0.1:<admin port>
    token: str
    config_path: Path
    gateway: asyncio.subprocess.Process
    redis: EmbeddedRedis

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as http, http.get(self.admin + "/metrics") as r:
            check(r.status == 200, f"/metrics answered {r.status}")
            return await r.text()

    async def admin_api(self, method: str, path: str) -> Any:
        async with aiohttp.ClientSession() as http:
            async with http.request(method, self.admin + path, headers=self.auth) as r:
                doc = await r.json()
                check(r.status == 200, f"{method} {path} answered {r.status}: {doc}")
                return doc

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as http:
            async with http.get(self.admin + "/readyz") as r:
                return r.status, await r.json()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels, from /metrics text."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


async def fresh_get(base: str, path: str) -> tuple[int, str]:
    """One request on a connection of its own (the kernel picks the worker)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(base + path, allow_redirects=False) as r:
            await r.read()
            return r.status, r.headers.get("X-Request-Id", "")


async def metrics_from_both_workers(ops: Ops) -> None:
    base = ops.visit.base
    before = await ops.metrics()
    n = 40
    workers: dict[str, int] = {}
    for _ in range(n):
        status, rid = await fresh_get(base, "/products")
        check(status == 200, f"GET /products answered {status}")
        workers[rid[:16]] = workers.get(rid[:16], 0) + 1  # the request id's process prefix
    after = await ops.metrics()
    added = metric(after, "gateway_requests_total") - metric(before, "gateway_requests_total")
    alive = metric(after, "gateway_worker_processes")
    print(f"    {n} requests on new connections, answered by {len(workers)} workers: "
          + ", ".join(f"{w}... {c}" for w, c in workers.items()))
    print(f"    /metrics: gateway_worker_processes {alive:g}, gateway_requests_total +{added:g}")
    check(alive == WORKERS, f"gateway_worker_processes is {alive:g}, expected {WORKERS}")
    check(len(workers) == WORKERS, f"only {len(workers)} worker(s) answered")
    # The admin listener is worker 0's: the other worker's requests count only if its
    # metrics are summed in.
    check(added >= n, f"/metrics counted {added:g} of the {n} requests")


async def population_moves(ops: Ops) -> None:
    async def sessions() -> float:
        return metric(await ops.metrics(), "gateway_redis_keys", family="session")

    async def settle(limit: float = 5.0) -> float:
        """The count once two passes agree (the sampler passes every 0.5 s)."""
        last, deadline = await sessions(), time.monotonic() + limit
        while time.monotonic() < deadline:
            await asyncio.sleep(0.6)
            now = await sessions()
            if now == last:
                return now
            last = now
        return last

    before = await settle()
    guests = 5
    for _ in range(guests):
        async with ops.visit.another_browser() as guest:
            status, _, _ = await guest.request(
                "POST", "/cart/add", data={"sku": PRODUCT, "qty": "1"})
            check(status == 200, f"a guest's add to cart answered {status}")
    deadline = time.monotonic() + 5
    after = await sessions()
    while after < before + guests and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        after = await sessions()
    carts = metric(await ops.metrics(), "gateway_redis_keys", family="cart")
    print(f"    gateway_redis_keys{{family=\"session\"}}: {before:g} -> {after:g} after "
          f"{guests} guests filled a cart; family=\"cart\": {carts:g}")
    check(after >= before + guests, "the session count did not follow the new guests")


async def admin_logs_a_user_out_everywhere(ops: Ops) -> None:
    browsers: list[tuple[Visit, contextlib.AbstractAsyncContextManager[Visit]]] = []
    uid = ""
    try:
        for _ in range(2):
            cm = ops.visit.another_browser()
            b = await cm.__aenter__()
            browsers.append((b, cm))
            status, path, _ = await b.request(
                "POST", "/login", data={"username": USER, "password": PASSWORD, "next": "/"})
            check(status == 200, f"login ended at {path} with {status}")
            data = await b.received()
            check(data["authenticated"] is True, "the login did not take")
            uid = data["fields"]["user_id"]
        listed = await ops.admin_api("GET", f"/admin/users/{uid}/sessions")
        print(f"    GET /admin/users/{uid}/sessions: {listed['count']} sessions")
        for s in listed["sessions"]:
            created, last = (time.strftime("%H:%M:%S", time.localtime(s[k]))
                             for k in ("created", "last_activity"))
            print(f"      id {s['id'][:16]}... created {created}, last activity {last}, "
                  f"page {s['current_page']}")
        check(listed["count"] >= 2,
              f"expected {USER}'s two sessions, the API lists {listed['count']}")
        for b, _ in browsers:
            token = b.cookie() or "-"
            check(token not in json.dumps(listed), "the admin API showed a cookie token")
        revoked = await ops.admin_api("DELETE", f"/admin/users/{uid}/sessions")
        print(f"    DELETE /admin/users/{uid}/sessions: {revoked}")
        check(revoked["revoked"] >= 2, f"revoked {revoked['revoked']} sessions")
        for i, (b, _) in enumerate(browsers, start=1):
            data = await b.received()
            check(data["authenticated"] is False,
                  f"browser {i} is still logged in after the admin's logout everywhere")
            print(f"    browser {i}'s next page: the shop sees a guest")
    finally:
        for _, cm in browsers:
            await cm.__aexit__(None, None, None)


async def readiness_follows_redis(ops: Ops) -> None:
    async def until(status: int, limit: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        while True:
            got, doc = await ops.readyz()
            if got == status:
                return doc
            check(time.monotonic() < deadline, f"/readyz stayed {got}, expected {status}")
            await asyncio.sleep(0.2)

    doc = await until(200)
    print(f"    /readyz 200: {doc['status']}, redis write {doc['checks']['redis']['ms']} ms")
    url = ops.redis.url
    stopped = url.startswith("unix://")
    pid = ops.redis.pid
    if stopped:
        await ops.redis.stop()
        print("    redis-server stopped")
    else:
        # A TCP fallback would come back on another port and password: stall it instead.
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        print("    redis-server stalled (SIGSTOP)")
    try:
        doc = await until(503)
        print(f"    /readyz 503: failed {doc['failed']}: {doc['checks']['redis'].get('error')}")
    finally:
        if stopped:
            check(await ops.redis.start() == url, "Redis came back under another URL")
            print("    redis-server started again")
        else:
            assert pid is not None
            os.kill(pid, signal.SIGCONT)
    doc = await until(200)
    print(f"    /readyz 200 again: {doc['status']}")


async def health_comprehensive(ops: Ops) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "health", "--config", str(ops.config_path),
        "--comprehensive", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT)
    out = (await proc.communicate())[0].decode()
    lines = [ln for ln in out.splitlines() if ln.strip()]
    print(f"    python -m gateway health --config {ops.config_path.name} --comprehensive "
          f"(exit {proc.returncode}):")
    for ln in lines:
        print(f"      {ln}")
    check(all(ln[:4].strip() in ("ok", "warn", "fail") for ln in lines),
          "health printed a line that is not a check")
    names = {ln[6:24].strip() for ln in lines}
    for name in ("config", "redis", "redis write", "clock skew", "gateway ready"):
        check(name in names, f"health printed no {name!r} check")
    check(proc.returncode in (0, 1), "health found a failure")


async def reload_under_load(ops: Ops) -> None:
    base = ops.visit.base
    status, _ = await fresh_get(base, NEW_ROUTE + "spring")
    print(f"    before: GET {NEW_ROUTE}spring -> {status} (the / route; the shop has no such page)")
    stop = asyncio.Event()
    results: dict[str, int] = {}

    async def load() -> None:
        async with aiohttp.ClientSession() as http:
            while not stop.is_set():
                try:
                    async with http.get(base + f"/products/{PRODUCT}") as r:
                        await r.read()
                        key = str(r.status)
                except (aiohttp.ClientError, TimeoutError) as e:
                    key = type(e).__name__
                results[key] = results.get(key, 0) + 1

    tasks = [asyncio.create_task(load()) for _ in range(8)]
    try:
        await asyncio.sleep(0.5)
        cfg = yaml.safe_load(ops.config_path.read_text())
        cfg["routes"].insert(0, {"path": NEW_ROUTE, "upstream": "shop", "session": "required",
                                 "login_url": "/login"})
        ops.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        ops.gateway.send_signal(signal.SIGHUP)
        print(f"    config rewritten with a route {NEW_ROUTE} (session: required, login_url "
              "/login); SIGHUP sent to the gateway")
        await asyncio.sleep(1.5)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    total = sum(results.values())
    failed = total - results.get("200", 0)
    print(f"    {total} requests from 8 clients during the reload: {failed} failed {results}")
    check(failed == 0, f"{failed} requests failed during the reload: {results}")
    answers = [await fresh_get(base, NEW_ROUTE + "spring") for _ in range(10)]
    print(f"    after: 10 new connections GET {NEW_ROUTE}spring -> "
          f"{sorted({s for s, _ in answers})} (to /login: the new route, in every worker)")
    check(all(s == 302 for s, _ in answers), f"the new route is not in force everywhere: {answers}")


async def ops_walk(ops: Ops) -> list[tuple[str, str | None]]:
    steps: list[tuple[str, Callable[[Ops], Awaitable[None]]]] = [
        (f"/metrics sums both workers' counters ({WORKERS} workers)", metrics_from_both_workers),
        ("/metrics: the session population moves", population_moves),
        (f"the admin API logs {USER} out everywhere; the shop's next page sees a guest",
         admin_logs_a_user_out_everywhere),
        ("/readyz: 503 while Redis is down, 200 when it is back", readiness_follows_redis),
        ("health --comprehensive: one line per check", health_comprehensive),
        ("SIGHUP with a new route under load: no request fails", reload_under_load),
    ]
    results: list[tuple[str, str | None]] = []
    for number, (name, step) in enumerate(steps, start=1):
        print(f"\n[ops {number}/{len(steps)}] {name}")
        try:
            await step(ops)
        except StepFailed as exc:
            print(f"    FAILED: {exc}")
            results.append((name, str(exc)))
            break
        except (aiohttp.ClientError, KeyError, ValueError, OSError) as exc:
            print(f"    FAILED: {type(exc).__name__}: {exc}")
            results.append((name, f"{type(exc).__name__}: {exc}"))
            break
        print("    ok")
        results.append((name, None))
    results += [(name, "not run") for name, _ in steps[len(results):]]
    return results

