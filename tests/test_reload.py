"""Reload on SIGHUP: routes, upstreams, plugins' options, log level swapped without
dropping a request; an invalid file refused with --check's line; settings that need a
restart named; with workers, the supervisor forwards SIGHUP to each."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
import weakref
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from gateway.__main__ import main as gateway_main
from gateway.config import parse_settings
from gateway.reload import ConfigSource, Reloader, restart_only_differences

from .conftest import RedisServer, Upstream, base_config, start_backend
from .ops_fixtures import runtime_of


def reloads(outcome: str) -> float:
    return REGISTRY.get_sample_value("gateway_config_reloads_total", {"outcome": outcome}) or 0.0


class Harness:
    """An in-process gateway whose config lives in a file, and its reloader."""

    def __init__(self, gw: TestClient, path: Path, cfg: dict[str, Any]) -> None:
        self.gw = gw
        self.path = path
        self.rt = runtime_of(gw)
        self.reloader = Reloader(self.rt, ConfigSource(str(path), parse_settings(cfg)))

    def write(self, cfg: dict[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump(cfg))

    async def reload(self, cfg: dict[str, Any] | None = None) -> bool:
        if cfg is not None:
            self.write(cfg)
        return await self.reloader.reload()


@pytest.fixture
async def harness(
    make_gateway: Any, redis_server: RedisServer, upstream: Upstream, tmp_path: Path
) -> Any:
    made: list[Harness] = []

    async def factory(**over: Any) -> tuple[Harness, dict[str, Any]]:
        cfg = base_config(redis_server.url, upstream.url, **over)
        gw = await make_gateway(cfg)
        h = Harness(gw, tmp_path / f"config{len(made)}.yaml", cfg)
        h.write(cfg)
        made.append(h)
        return h, cfg

    yield factory
    for h in made:
        await h.reloader.close()


async def test_new_route_takes_effect_and_unchanged_upstreams_are_kept(
    harness: Any, upstream: Upstream
) -> None:
    h, cfg = await harness()
    assert (await h.gw.get("/orders/1")).status == 200  # the "/" route, optional
    old_table = h.rt.table
    cfg["routes"].insert(0, {"path": "/orders/", "upstream": "app", "session": "required"})
    before = reloads("ok")
    assert await h.reload(cfg)
    assert reloads("ok") - before == 1
    assert (await h.gw.get("/orders/1")).status == 401
    assert h.rt.table is not old_table and h.rt.gateway.table is h.rt.table
    # Same settings: the same Upstream, its warm pool and ejections.
    assert h.rt.table.upstreams["app"] is old_table.upstreams["app"]


async def test_a_request_in_flight_finishes_on_the_old_table(
    harness: Any, upstream: Upstream
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.6)
        return web.Response(text="slow done")

    upstream.routes["/slow"] = slow
    h, cfg = await harness()
    old_table = h.rt.table
    old_app = old_table.upstreams["app"]
    in_flight = asyncio.create_task(h.gw.get("/slow"))
    await asyncio.sleep(0.2)
    assert old_table.inflight == 1
    # Changed settings: a new Upstream replaces the old one.
    cfg["upstreams"]["app"]["read_timeout"] = 7
    assert await h.reload(cfg)
    new_app = h.rt.table.upstreams["app"]
    assert new_app is not old_app
    assert (await h.gw.get("/fast")).status == 200  # new requests on the new table
    await asyncio.sleep(0.1)  # the old table's retirement has had its turns
    assert not old_app.pools[old_app.servers[0]]._closed  # still in use
    resp = await in_flight
    assert resp.status == 200 and await resp.text() == "slow done"
    for _ in range(40):
        if old_app.pools[old_app.servers[0]]._closed:
            break
        await asyncio.sleep(0.05)
    assert old_app.pools[old_app.servers[0]]._closed, "the old pool is closed once unused"
    assert not new_app.pools[new_app.servers[0]]._closed


async def test_invalid_file_refused_with_the_check_line(
    harness: Any, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    h, cfg = await harness()
    old_table = h.rt.table
    bad = {**cfg, "routes": [{"path": "/", "upstream": "app", "session": "maybe"}]}
    h.write(bad)
    assert gateway_main(["--config", str(h.path), "--check"]) == 2
    check_line = capsys.readouterr().err.strip()
    assert check_line == "config error: routes[0].session: must be one of none, optional, required"
    caplog.set_level(logging.INFO, "gateway.reload")
    before = reloads("refused")
    assert not await h.reload()
    assert reloads("refused") - before == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(check_line + " (reload refused")
    assert h.rt.table is old_table
    assert (await h.gw.get("/x")).status == 200

    h.path.write_text("routes: [unclosed")
    assert not await h.reload()
    h.path.unlink()
    assert not await h.reload()
    assert h.rt.table is old_table


async def test_settings_that_need_a_restart_are_named(
    harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h, cfg = await harness()
    running_listen = h.rt.settings.listen
    new = {
        **cfg,
        "listen": "127.0.0.1:1",
        "redis": {**cfg["redis"], "url": "redis://127.0.0.1:2/0"},
        "workers": 3,
        "limits": {"max_connections": 99},
        "logging": {"format": "json", "level": "INFO"},
        "admin": {"token": "a-secret-admin-token-123"},
    }
    caplog.set_level(logging.INFO, "gateway.reload")
    assert await h.reload(new)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for name in (
        "listen",
        "redis.url",
        "workers",
        "limits.max_connections",
        "logging.format",
        "admin.token",
    ):
        assert name in warnings[0], name
    assert "a-secret-admin-token-123" not in warnings[0]
    assert h.rt.settings.listen == running_listen
    assert h.rt.settings.workers == 1


def test_restart_only_differences_ignore_what_a_reload_applies() -> None:
    cfg = base_config("redis://127.0.0.1:1/0", "http://127.0.0.1:2")
    old = parse_settings(cfg)
    new = parse_settings(
        {
            **cfg,
            "routes": [{"path": "/", "upstream": "other"}],
            "upstreams": {"other": {"servers": ["http://127.0.0.1:3"]}},
            "plugins": ["cart"],
            "paths": {"strict": True},
            "logging": {"level": "DEBUG", "access_log": True},
        }
    )
    assert restart_only_differences(old, new) == []


async def test_plugin_options_swap_and_the_old_chain_goes(harness: Any, upstream: Upstream) -> None:
    limit = {"per": "address", "limit": 100, "window": 60}
    h, cfg = await harness(plugins=[{"rate_limit": limit}])
    old_chain = h.rt.chain
    for _ in range(3):
        assert (await h.gw.get("/a")).status == 200
    cfg["plugins"] = [{"rate_limit": {**limit, "limit": 1}}]
    assert await h.reload(cfg)
    chain = h.rt.chain
    assert chain is not old_chain
    gateway, sessions = h.rt.gateway, h.rt.sessions
    assert gateway.chain is chain and gateway.instructions.chain is chain
    assert sessions.actions.chain is chain and sessions.resolver.chain is chain
    # The 3 requests of this window were within 100; they are over 1.
    statuses = [(await h.gw.get("/a")).status for _ in range(2)]
    assert statuses == [429, 429]
    # Nothing holds the old chain once it is retired (a holder a reload missed would
    # keep running the old plugins' hooks).
    ref = weakref.ref(old_chain)
    del old_chain
    for _ in range(40):
        gc.collect()
        if ref() is None:
            break
        await asyncio.sleep(0.05)
    assert ref() is None, gc.get_referrers(ref())


async def test_plugins_unchanged_keep_the_chain(harness: Any) -> None:
    h, cfg = await harness(plugins=["cart"])
    old_chain = h.rt.chain
    cfg["routes"].insert(0, {"path": "/new/", "upstream": "app"})
    assert await h.reload(cfg)
    assert h.rt.chain is old_chain


async def test_log_level_and_access_log_follow_the_file(harness: Any) -> None:
    h, cfg = await harness()
    root = logging.getLogger()
    level = root.level
    try:
        assert await h.reload({**cfg, "logging": {"level": "ERROR", "access_log": True}})
        assert root.level == logging.ERROR
        assert h.rt.gateway.access is not None
        assert await h.reload({**cfg, "logging": {"level": "INFO"}})
        assert root.level == logging.INFO and h.rt.gateway.access is None
    finally:
        root.setLevel(level)


async def test_close_retires_what_is_still_swapped_out(harness: Any, upstream: Upstream) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return web.Response(text="ok")

    upstream.routes["/slow"] = slow
    h, cfg = await harness(plugins=["cart"])
    old_chain = h.rt.chain
    shut: list[str] = []
    for p in old_chain.plugins:
        orig = p.shutdown

        async def shutdown(orig: Any = orig, name: str = p.name) -> None:
            shut.append(name)
            await orig()

        p.shutdown = shutdown  # type: ignore[method-assign]
    pending = asyncio.create_task(h.gw.get("/slow"))
    await asyncio.sleep(0.1)
    cfg["plugins"] = [{"cart": {"contents_header": True}}]
    assert await h.reload(cfg)
    await asyncio.sleep(0.1)
    assert shut == []  # a request still runs on it
    assert (await pending).status == 200
    await h.reloader.close()
    assert shut == ["cart"]


# ---------------------------------------------------------------- a real process


async def _hammer(url: str, stop: asyncio.Event, results: dict[str, int]) -> None:
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            try:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    await r.read()
                    key = str(r.status)
            except (aiohttp.ClientError, TimeoutError) as e:
                key = type(e).__name__
            results[key] = results.get(key, 0) + 1


def test_sighup_with_workers_under_load_fails_no_request(
    gateway_process: Any, redis_server: RedisServer
) -> None:
    async def scenario() -> None:
        async def backend(request: web.Request) -> web.Response:
            return web.Response(text="route " + request.path)

        runner, url = await start_backend(backend)
        cfg = base_config(redis_server.url, url)
        cfg["workers"] = 2
        gp = await asyncio.to_thread(gateway_process, cfg)
        path = gp.log_path.with_suffix(".yaml")
        await asyncio.sleep(1.0)  # both workers listening
        stop = asyncio.Event()
        results: dict[str, int] = {}
        load = [asyncio.create_task(_hammer(gp.url + "/static/x", stop, results)) for _ in range(8)]
        try:
            written = yaml.safe_load(path.read_text())
            for i in range(3):
                await asyncio.sleep(0.4)
                written["routes"].insert(
                    0, {"path": f"/gone{i}/", "upstream": "app", "session": "required"}
                )
                path.write_text(yaml.safe_dump(written))
                gp.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.8)
        finally:
            stop.set()
            await asyncio.gather(*load)
        assert set(results) == {"200"}, results
        assert results["200"] > 50
        # Every worker took the last file: each new connection lands on either.
        for _ in range(20):
            async with aiohttp.ClientSession() as s:
                async with s.get(gp.url + "/gone2/x") as r:
                    assert r.status == 401
        gp.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(gp.proc.wait, 30) == 0, gp.log()
        await runner.cleanup()
        log = gp.log()
        assert log.count("config reloaded from") == 6, log  # 3 reloads x 2 workers

    asyncio.run(scenario())


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def test_sighup_invalid_file_keeps_serving(gateway_process: Any, redis_server: RedisServer) -> None:
    async def scenario() -> None:
        runner, url = await start_backend(_ok)
        gp = await asyncio.to_thread(gateway_process, base_config(redis_server.url, url))
        path = gp.log_path.with_suffix(".yaml")
        path.write_text("listen: [")
        gp.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "reload refused" not in gp.log() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "config error: <root>: not valid YAML" in gp.log()
        async with aiohttp.ClientSession() as s, s.get(gp.url + "/static/a") as r:
            assert r.status == 200
        assert gp.proc.poll() is None
        gp.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(gp.proc.wait, 30) == 0
        await runner.cleanup()

    asyncio.run(scenario())
