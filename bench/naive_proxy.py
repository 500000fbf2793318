"""Scenario c: the case study's design as a proxy, for comparison with the gateway.

Per request, exactly the case study's code path: read the session hash (HGETALL
session:<sha256(token)>), then the `update_session_activity` pipeline (HSET
last_activity, HSET current_page, HINCRBY page_views, EXPIRE; redis-py's default
transactional pipeline, so MULTI/EXEC around it), awaited before proxying to the backend
through one shared aiohttp ClientSession.

Run as `python -m bench.naive_proxy --port P --upstream http://127.0.0.1:B --redis URL`.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import AsyncIterator

import aiohttp
import redis.asyncio as aioredis
import uvloop
from aiohttp import web

from bench.backend import serve_forever

HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    }
)  # fmt: skip
TTL = 3600
CLIENT = web.AppKey("client", aiohttp.ClientSession)
REDIS = web.AppKey("redis", aioredis.Redis)
UPSTREAM = web.AppKey("upstream", str)


async def handle(request: web.Request) -> web.StreamResponse:
    r = request.app[REDIS]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    token = request.cookies.get("sid")
    if token:
        key = "session:" + hashlib.sha256(token.encode()).hexdigest()
        session = await r.hgetall(key)
        if session:
            pipe = r.pipeline()
            pipe.hset(key, "last_activity", str(time.time()))
            pipe.hset(key, "current_page", request.path)
            pipe.hincrby(key, "page_views", 1)
            pipe.expire(key, TTL)
            await pipe.execute()
            # Hand the session to the backend like the gateway does, so both do the
            # same work apart from how they talk to Redis.
            for name, value in session.items():
                headers["X-Session-" + name.decode().replace("_", "-").title()] = value.decode()
    url = request.app[UPSTREAM] + request.path_qs
    body = await request.read()
    async with request.app[CLIENT].request(
        request.method, url, headers=headers, data=body or None, allow_redirects=False
    ) as resp:
        payload = await resp.read()
        out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
        return web.Response(status=resp.status, body=payload, headers=out)


async def resources(app: web.Application) -> AsyncIterator[None]:
    # One ClientSession and one Redis pool for the process's lifetime (aiohttp's advice).
    connector = aiohttp.TCPConnector(limit=256, limit_per_host=256)
    app[CLIENT] = aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
    )
    yield
    await app[CLIENT].close()
    await app[REDIS].aclose()


def make_app(upstream: str, redis_url: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app[REDIS] = aioredis.Redis.from_url(redis_url, max_connections=256)
    app.cleanup_ctx.append(resources)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--redis", required=True)
    a = ap.parse_args()
    uvloop.run(serve_forever(make_app(a.upstream, a.redis), a.port))


if __name__ == "__main__":
    main()
