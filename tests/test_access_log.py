"""The access log (one JSON object per request on demand), and no session token in any
log line, at DEBUG, whatever the gateway does."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.logs import JsonFormatter
from gateway.sessions import public_id

from .conftest import RedisServer, Upstream, base_config, login, start_backend
from .ops_fixtures import ADMIN_TOKEN


def access_docs(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]


async def test_one_json_object_per_request(
    make_gateway: Any, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await make_gateway(logging={"access_log": True})
    caplog.set_level(logging.INFO, "gateway.access")
    token = await login(gw, upstream, "12")
    resp = await gw.get("/products/1?reset=secret", headers={"X-Request-Id": "req-abcdef12"})
    assert resp.status == 200
    await gw.get("/a%00b")  # refused before routing (an encoded control byte)
    docs = access_docs(caplog)
    assert len(docs) == 3
    login_doc, page, refused = docs
    assert login_doc["route"] == "/login" and login_doc["method"] == "POST"
    # The session the request ended with: the one its login created.
    assert login_doc["session"] == public_id(token)[:16]
    assert (
        page
        == {
            "request_id": "req-abcdef12",
            "method": "GET",
            "path": "/products/1",  # never the query
            "route": "/",
            "status": 200,
            "duration_ms": page["duration_ms"],
            "upstream": upstream.url,
            "session": public_id(token)[:16],
            "client": "127.0.0.1",
        }
    )
    assert 0 < page["duration_ms"] < 5000
    assert refused["status"] == 400 and refused["route"] is None and refused["upstream"] is None
    for r in caplog.records:
        assert token not in r.getMessage()


async def test_off_by_default(
    gw: Any, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await gw.get("/x")
    assert not access_docs(caplog)


def test_json_format_puts_the_fields_on_the_line() -> None:
    doc = {"request_id": "r1", "status": 200, "route": "/"}
    record = logging.LogRecord("gateway.access", logging.INFO, "", 0, "%s", ("{}",), None)
    record.access = doc
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "access" and line["status"] == 200 and line["route"] == "/"


@pytest.mark.parametrize("raw_token_keys", [False, True])
def test_no_token_in_any_log_line_at_debug(
    gateway_process: Any, redis_server: RedisServer, raw_token_keys: bool
) -> None:
    """Every path that touches a session, at DEBUG with the access log on: login, pages
    from Redis and the near-cache, a cart, a bad and an expired cookie, the admin API,
    a reload, logout, Redis killed and back, shutdown. No log line holds a token."""

    async def backend(request: web.Request) -> web.Response:
        r = web.Response(text="ok")
        if request.path == "/login":
            r.headers["X-Session-Login"] = "user_id=77; username=ann"
        elif request.path == "/add":
            r.headers["X-Session-Cart-Add"] = "sku=s1; qty=1; price=2.50"
        elif request.path == "/logout":
            r.headers["X-Session-Logout"] = "all"
        return r

    async def scenario() -> None:
        runner, url = await start_backend(backend)
        cfg = base_config(redis_server.url, url)
        cfg["routes"] = [
            {"path": "/login", "upstream": "app", "instructions": ["login"]},
            {"path": "/", "upstream": "app", "instructions": ["logout", "cart"], "guest": True},
        ]
        cfg["plugins"] = ["cart"]
        cfg["logging"] = {"level": "DEBUG", "format": "json", "access_log": True}
        cfg["session"]["raw_token_keys"] = raw_token_keys
        cfg["admin"] = {"token": ADMIN_TOKEN}
        gp = await asyncio.to_thread(gateway_process, cfg)
        tokens: set[str] = set()
        admin = f"http://127.0.0.1:{gp.admin_port}"
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as s:

            async def get(path: str, **kw: Any) -> None:
                async with s.get(gp.url + path, **kw) as r:
                    await r.read()
                    if "sid" in r.cookies and r.cookies["sid"].value:
                        tokens.add(r.cookies["sid"].value)

            await get("/add")  # a guest with a cart
            await get("/login")
            for i in range(3):
                await get(f"/page/{i}")
            await get("/page", cookies={"sid": "not-a-token"})
            await get("/page", cookies={"sid": "B" * 43})
            async with aiohttp.ClientSession() as other:
                async with other.get(admin + "/admin/users/77/sessions", headers=auth) as r:
                    listed = await r.json()
                sid = listed["sessions"][0]["id"]
                q = "?user_id=77" if raw_token_keys else ""
                async with other.get(f"{admin}/admin/sessions/{sid}{q}", headers=auth) as r:
                    assert r.status == 200
                async with other.get(admin + "/readyz") as r:
                    assert r.status == 200
            gp.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            redis_server.kill()
            await get("/page/down")
            redis_server.start()
            await asyncio.sleep(0.5)
            await get("/login")
            await get("/logout")
        gp.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(gp.proc.wait, 30) == 0, gp.log()
        await runner.cleanup()
        log = gp.log()
        assert len(tokens) >= 3
        assert '"level":"debug"' in log, "the gateway did not log at DEBUG"
        assert '"msg":"access"' in log and "config reloaded" in log
        for token in tokens:
            assert token not in log, f"a token is in the log: {token[:8]}..."

    asyncio.run(scenario())
