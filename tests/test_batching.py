"""Session reads batched per event-loop tick, with plugins' reads riding along."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from redis.exceptions import ResponseError

from gateway.redis.batching import BatchedReader

from .conftest import GatewayFactory, RedisServer, Upstream, login


async def test_one_tick_is_one_pipeline_and_a_failing_extra_stays_local(
    redis_server: RedisServer, rdb: redis.Redis
) -> None:
    rdb.hset("session:a", mapping={"user_id": "1"})
    rdb.hset("session:b", mapping={"user_id": "2"})
    rdb.set("cart:b", "not a hash")  # HGETALL on it fails with WRONGTYPE
    r = aioredis.Redis(port=redis_server.port, decode_responses=True)
    reader = BatchedReader(r, timeout=1.0)
    rdb.config_resetstat()
    (fa, ea), (fb, eb), (fc, ec) = await asyncio.gather(
        reader.hgetall("session:a", (("HGETALL", "cart:a"),)),
        reader.hgetall("session:b", (("HGETALL", "cart:b"),)),
        reader.hgetall("session:none"),
    )
    assert fa == {"user_id": "1"} and ea == [{}]
    assert fb == {"user_id": "2"} and isinstance(eb[0], ResponseError)
    assert fc == {} and ec == []
    assert rdb.info("commandstats")["cmdstat_hgetall"]["calls"] == 5
    await r.aclose()


async def test_cart_prefetch_failure_keeps_the_session(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw: TestClient = await make_gateway(plugins=["cart"])
    await login(gw, upstream, "31")
    await gw.get("/page")
    assert upstream.last.header("X-Session-Cart-Items") == "0"
    rdb.set("user_cart:31", "corrupt")  # the signed-in user's cart
    await gw.get("/page")
    assert upstream.last.header("X-Session-User-Id") == "31"  # still logged in
    assert upstream.last.header("X-Session-Cart-Items") is None  # cart omitted, not faked
