"""Process lifecycle: SIGTERM drains in-flight requests; logs are one line per event."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import aiohttp
from aiohttp import web

from .conftest import RedisServer, base_config, start_backend


async def _slow(request: web.Request) -> web.Response:
    if request.path.endswith("/slow"):
        await asyncio.sleep(1.0)
    return web.Response(text="done " + request.path)


def _logs_in(user_id: str) -> Any:
    async def backend(request: web.Request) -> web.Response:
        r = web.Response(text="ok")
        if request.path == "/login":
            r.headers["X-Session-Login"] = f"user_id={user_id}"
        return r

    return backend


def test_sigterm_lets_in_flight_requests_finish(
    gateway_process: Any, redis_server: RedisServer
) -> None:
    async def scenario() -> None:
        runner, url = await start_backend(_slow)
        gp = await asyncio.to_thread(gateway_process, base_config(redis_server.url, url))
        async with aiohttp.ClientSession() as s:
            slow = asyncio.create_task(s.get(gp.url + "/static/slow"))
            await asyncio.sleep(0.3)  # the request is now waiting on the backend
            gp.proc.send_signal(signal.SIGTERM)
            resp = await slow
            assert resp.status == 200
            assert await resp.text() == "done /static/slow"
            # New connections are refused once the gateway stopped listening.
            await asyncio.sleep(0.2)
            refused = False
            try:
                await s.get(gp.url + "/static/late", timeout=aiohttp.ClientTimeout(total=2))
            except aiohttp.ClientError:
                refused = True
            assert refused
        rc = await asyncio.to_thread(gp.proc.wait, 20)
        await runner.cleanup()
        assert rc == 0, gp.log()

    asyncio.run(scenario())


def test_json_logs_one_line_per_event_with_request_id(
    gateway_process: Any, redis_server: RedisServer
) -> None:
    async def scenario() -> None:
        runner, url = await start_backend(_logs_in("3"))
        cfg = base_config(redis_server.url, url)
        cfg["logging"] = {"format": "json"}
        gp = await asyncio.to_thread(gateway_process, cfg)
        async with aiohttp.ClientSession() as s:
            async with s.post(gp.url + "/login", headers={"X-Request-Id": "req-12345678"}) as r:
                assert r.status == 200
            async with s.get(gp.url + "/health/admin-is-separate") as r:
                assert r.status == 200
            async with s.get(f"http://127.0.0.1:{gp.admin_port}/healthz") as r:
                assert r.status == 200
                assert (await r.json())["status"] == "ok"
            async with s.get(f"http://127.0.0.1:{gp.admin_port}/metrics") as r:
                assert "gateway_requests_total" in await r.text()
        gp.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(gp.proc.wait, 20)
        await runner.cleanup()
        lines = [ln for ln in gp.log().splitlines() if ln.strip()]
        docs = [json.loads(ln) for ln in lines]  # every line is one JSON document
        login = [d for d in docs if d["msg"].startswith("login user_id='3'")]
        assert login and login[0]["request_id"] == "req-12345678"

    asyncio.run(scenario())


def test_workers_share_the_port_and_all_flush_on_sigterm(
    gateway_process: Any, redis_server: RedisServer
) -> None:
    import redis as redis_sync

    async def scenario() -> None:
        pids: set[str] = set()

        runner, url = await start_backend(_logs_in("77"))
        cfg = base_config(redis_server.url, url)
        cfg["workers"] = 2
        cfg["activity"] = {"flush_interval": 5}
        gp = await asyncio.to_thread(gateway_process, cfg)
        await asyncio.sleep(1.0)  # both workers listening
        async with aiohttp.ClientSession() as s:
            async with s.post(gp.url + "/login") as resp:
                token = resp.cookies["sid"].value
            for i in range(40):
                # A new connection each time, so the kernel spreads them over workers.
                async with aiohttp.ClientSession() as one:
                    async with one.get(gp.url + f"/w/{i}", cookies={"sid": token}) as resp:
                        assert resp.status == 200
                        pids.add(resp.headers.get("X-Request-Id", "")[:16])
        assert len(pids) == 2, "both workers should have answered (request id prefixes)"
        gp.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(gp.proc.wait, 30)
        await runner.cleanup()
        assert rc == 0, gp.log()
        from gateway.sessions import public_id

        r = redis_sync.Redis(port=redis_server.port, decode_responses=True)
        assert r.hget(f"session:{public_id(token)}", "page_views") == "40", gp.log()

    asyncio.run(scenario())
