"""The Redis layer (gateway/redis/): key names, the script helper, and the library
internals it wraps (each such use is tested here, so an upgrade that moves them fails)."""

from __future__ import annotations

import asyncio

import pytest
import redis
from multidict import CIMultiDict
from redis.asyncio import ConnectionPool

from gateway.redis import Keys, Script
from gateway.redis.tracking import set_invalidation_handler
from gateway.upstream_client import serialize_head

from .conftest import RedisServer


def test_key_names_keep_the_contract_layout_and_share_slots_under_tags() -> None:
    plain = Keys()
    assert plain.session("abc") == "session:abc"
    assert plain.of("cart", "abc") == "cart:abc"
    assert plain.user_sessions("42") == "user_sessions:42"
    assert plain.of_user("user_cart", "42") == "user_cart:42"
    assert plain.named("viewed:ranking") == "viewed:ranking"
    tagged = Keys("p:", hash_tags=True)
    from redis.crc import key_slot

    s = tagged.session("abc")
    assert s == "p:session:{abc}"
    assert key_slot(s.encode()) == key_slot(tagged.of("cart", "abc").encode())
    assert key_slot(s.encode()) == key_slot(tagged.of("viewed", "abc").encode())
    u = tagged.user_sessions("abc")
    # A user's keys are in the user's slot, and a user id cannot name a session's slot.
    assert key_slot(u.encode()) == key_slot(tagged.of_user("user_cart", "abc").encode())
    assert key_slot(u.encode()) == key_slot(tagged.user_sessions_ending("abc").encode())
    assert u == "p:user_sessions:{u:abc}"


async def test_script_helper_loads_on_noscript(redis_server: RedisServer) -> None:
    r = redis.asyncio.Redis(port=redis_server.port, decode_responses=True)
    try:
        s = Script("return ARGV[1] .. KEYS[1]")
        await r.script_flush()
        assert await s.run(r.execute_command, ["k"], ["v"]) == "vk"
        assert await r.script_exists(s.sha) == [True]
        await r.script_flush()  # Redis restarted, failed over, flushed: loaded again
        assert await s.run(r.execute_command, ["k2"], ["w"]) == "wk2"
    finally:
        await r.aclose()


async def test_redis_py_push_handler_hook_still_there(redis_server: RedisServer) -> None:
    """tracking.set_invalidation_handler reaches a connection's RESP3 parser (private in
    redis-py): the handler must receive a real invalidation push."""
    pool = ConnectionPool.from_url(redis_server.url, protocol=3, decode_responses=True)
    conn = pool.make_connection()
    got: list[object] = []

    async def handler(message: list[object]) -> None:
        got.append(message)

    await conn.connect()
    try:
        set_invalidation_handler(conn, handler)
        await conn.send_command("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "t:")
        assert await conn.read_response() == "OK"
        other = redis.Redis(port=redis_server.port)
        other.set("t:x", "1")
        other.close()
        await conn.send_command("PING")
        async with asyncio.timeout(5):
            while not got:
                await conn.read_response(timeout=1)
        assert got and "t:x" in str(got[0])
    finally:
        await conn.disconnect()
        await pool.disconnect()


def test_aiohttp_head_serializer_still_refuses_injection() -> None:
    """upstream_client.serialize_head is aiohttp's private _serialize_headers: it must
    still write a plain head and refuse CR/LF in names and values."""
    head = serialize_head("GET / HTTP/1.1", CIMultiDict({"Host": "h", "X-A": "1"}))
    assert head == b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n"
    for bad in ({"X-A": "1\r\nX-Session-User-Id: 7"}, {"X-A\r\nX-B": "1"}, {"X-A": "a\nb"}):
        with pytest.raises(ValueError):
            serialize_head("GET / HTTP/1.1", CIMultiDict(bad))
