"""`python -m bench.hotpath`: in-process CPU of the per-request session work on a hit.

Times what a session request adds in the gateway process on a near-cache hit, without
any I/O: resolving the session from the cookie (`SessionResolver.resolve`), building
the upstream headers with the `X-Session-*` ones (`UpstreamHeaders.build`, which also
does the header copy every request makes) and recording the activity
(`Gateway.record_activity`), over 1,000 cached sessions. Warm CPU caches and no other
process: a lower bound of the real cost, for comparing two versions of that code
(run it in each checkout). Nothing here talks to Redis or a backend.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from bench import gateway_proc
from gateway.chain import Chain
from gateway.config import parse_settings
from gateway.plugin import RequestContext
from gateway.proxy import Gateway
from gateway.redis import RedisLayer, open_redis
from gateway.routing import RouteTable
from gateway.sessions import new_token, public_id
from gateway.sessions.layer import SessionLayer


async def measure(rounds: int, per_round: int) -> list[float]:
    settings = parse_settings(gateway_proc.gateway_config(1, 1, 2))
    # Never contacted: every lookup below is a near-cache hit. The layer is built the way
    # the gateway builds it (sessions/layer.py), and never started: the cache is turned
    # on by hand and nothing goes to Redis.
    redis: RedisLayer = await open_redis(settings)
    chain = Chain([])
    sessions = SessionLayer(settings, redis, chain)
    cache = sessions.cache
    assert cache is not None
    cache.enable()
    cache.max_age = 1e9
    keys = sessions.keys
    table = RouteTable(settings)
    async with aiohttp.ClientSession() as ws_client:
        gw = Gateway(settings, table, sessions, chain, ws_client)
        route = table.router.match("/products/x", "GET", "h")
        assert route is not None
        tokens = [new_token() for _ in range(1000)]
        now = f"{time.time():.3f}"
        for t in tokens:
            key = keys.session(public_id(t))
            cache.end(key, cache.begin(key), {
                "user_id": "1", "username": "u1", "email": "u1@example.com",
                "login_time": now, "last_activity": now, "page_views": "3",
            })  # fmt: skip
        requests = [
            make_mocked_request("GET", "/products/laptop-123", headers=CIMultiDict(
                {"Host": "h", "Cookie": f"sid={t}", "User-Agent": "wrk"}))
            for t in tokens
        ]  # fmt: skip
        out = []
        for _ in range(rounds):
            started = time.perf_counter()
            for i in range(per_round):
                ctx = RequestContext(
                    request=requests[i % 1000], route=route, request_id="r" * 32,
                    path="/products/laptop-123", target="/products/laptop-123",
                )  # fmt: skip
                await gw.resolver.resolve(ctx)
                assert ctx.session is not None
                gw.outbound.build(ctx)
                gw.record_activity(ctx, 200)
            out.append((time.perf_counter() - started) / per_round * 1e6)
            sessions.activity._pending.clear()
        table.close()
        await redis.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--requests", type=int, default=20_000, help="per round")
    a = ap.parse_args()
    res = asyncio.run(measure(a.rounds, a.requests))
    print(f"session work per request on a hit: min {min(res):.2f} µs, "
          f"median {statistics.median(res):.2f} µs ({a.rounds} rounds of {a.requests:,})")


if __name__ == "__main__":
    main()
