"""The plugin chain: faults, direct answers, per-route switches, config errors, and the
four built-in plugins working together."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from aiohttp import web
from prometheus_client import REGISTRY

from gateway.chain import validate_plugins
from gateway.config import ConfigError, parse_settings
from gateway.plugin import Plugin, PluginConfig, RequestContext, ResponseHead

from ..conftest import ROOT, GatewayFactory, RedisServer, Upstream, base_config, wait_for

BOOM = "tests.plugins.test_chain:Boom"
CLOSED = "tests.plugins.test_chain:BoomClosed"
TEAPOT = "tests.plugins.test_chain:Teapot"
TAGGER = "tests.plugins.test_chain:Tagger"


class Boom(Plugin):
    """Raises in its request hook on /boom."""

    async def request(self, ctx: RequestContext) -> web.StreamResponse | None:
        if ctx.request.path.startswith("/boom"):
            raise RuntimeError("boom")
        return None


class BoomClosed(Boom):
    fault_policy = "closed"


class Teapot(Plugin):
    """Answers /tea itself."""

    async def request(self, ctx: RequestContext) -> web.StreamResponse | None:
        if ctx.request.path == "/tea":
            ctx.state["teapot"] = True
            return web.Response(status=418, text="short and stout")
        return None


class TaggerConfig(PluginConfig):
    value: str = "tagged"


class Tagger(Plugin):
    """Adds a response header, and shows which plugin answered."""

    Config = TaggerConfig

    async def response(self, ctx: RequestContext, head: ResponseHead) -> None:
        head.headers["X-Tag"] = self.config.value
        head.headers["X-From-Upstream"] = str(head.from_upstream).lower()


def errors(name: str) -> float:
    return REGISTRY.get_sample_value("gateway_plugin_errors_total", {"plugin": name}) or 0.0


async def test_a_raising_hook_is_logged_counted_and_contained(
    make_gateway: GatewayFactory, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await make_gateway(plugins=[BOOM, TAGGER])
    before = errors(BOOM)
    with caplog.at_level(logging.ERROR, logger="gateway.plugin"):
        resp = await gw.get("/boom")
    assert resp.status == 200  # open: as if the hook had returned None
    assert resp.headers["X-Tag"] == "tagged"  # the chain went on
    assert errors(BOOM) == before + 1
    assert any(
        BOOM in r.getMessage() and "request hook raised" in r.getMessage() for r in caplog.records
    )
    assert (await gw.get("/fine")).status == 200
    assert [r.raw_path for r in upstream.received] == ["/boom", "/fine"]


async def test_closed_fault_policy_answers_503(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await make_gateway(plugins=[CLOSED])
    resp = await gw.get("/boom")
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "5"
    assert upstream.received == []
    assert (await gw.get("/fine")).status == 200


async def test_a_direct_answer_still_runs_response_hooks(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await make_gateway(plugins=[TAGGER, TEAPOT])
    resp = await gw.get("/tea")
    assert resp.status == 418
    assert await resp.text() == "short and stout"
    assert resp.headers["X-Tag"] == "tagged"
    assert resp.headers["X-From-Upstream"] == "false"
    assert upstream.received == []
    resp = await gw.get("/coffee")
    assert resp.headers["X-From-Upstream"] == "true"


async def test_plugin_disabled_per_route(make_gateway: GatewayFactory) -> None:
    routes = [
        {"path": "/plain/", "upstream": "app", "disable_plugins": [TAGGER, "rate_limit"]},
        {"path": "/", "upstream": "app"},
    ]
    gw = await make_gateway(
        routes=routes,
        plugins=[TAGGER, {"rate_limit": {"per": "address", "limit": 1, "window": 60}}],
    )
    assert (await gw.get("/x")).headers["X-Tag"] == "tagged"
    assert (await gw.get("/x")).status == 429
    for _ in range(3):
        resp = await gw.get("/plain/x")
        assert resp.status == 200
        assert "X-Tag" not in resp.headers and "RateLimit-Limit" not in resp.headers


@pytest.mark.parametrize(
    "plugins,message",
    [
        (
            ["cart", {"rate_limit": {"limit": 0}}],
            r"^plugins\[1\]\.rate_limit\.limit: Input should be greater than or equal to 1$",
        ),
        (
            [{"rate_limit": {"per": "user"}}],
            r"^plugins\[0\]\.rate_limit\.per: must be one of session, address$",
        ),
        (
            [{"rate_limit": {"on_redis_error": "maybe"}}],
            r"^plugins\[0\]\.rate_limit\.on_redis_error: must be one of allow, deny$",
        ),
        ([{"cart": {"ttl": "soon"}}], r"^plugins\[0\]\.cart\.ttl: "),
        ([{"cart": {"colour": "red"}}], r"^plugins\[0\]\.cart\.colour: unknown key$"),
        (
            ["cart", {"page_cache": {"paths": ["products"]}}],
            r"^plugins\[1\]\.page_cache\.paths: must list path prefixes starting with /$",
        ),
        (
            [{"viewed_items": {"pattern": "/p/"}}],
            r"^plugins\[0\]\.viewed_items\.pattern: must start with / and contain \{item\}",
        ),
        ([{TAGGER: {"value": 3}}], r"^plugins\[0\]\.tests\.plugins\.test_chain:Tagger\.value: "),
        (["nonexistent_plugin"], r"^plugins\.nonexistent_plugin: cannot import"),
    ],
)
def test_bad_plugin_config_names_the_key(
    redis_server: RedisServer, plugins: list[Any], message: str
) -> None:
    cfg = base_config(redis_server.url, "http://127.0.0.1:1", plugins=plugins)
    with pytest.raises(ConfigError, match=message):
        validate_plugins(parse_settings(cfg))


def test_check_exits_2_on_bad_plugin_config(tmp_path: Path) -> None:
    cfg = base_config(
        "redis://127.0.0.1:1/0",
        "http://127.0.0.1:1",
        plugins=["cart", {"rate_limit": {"limit": -5}}],
    )
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(path), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "plugins[1].rate_limit.limit:" in proc.stdout + proc.stderr


async def test_the_four_builtins_together(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    routes = [
        {"path": "/", "upstream": "app", "guest": True, "instructions": ["cart"]},
    ]
    gw = await make_gateway(
        routes=routes,
        plugins=[
            {"rate_limit": {"per": "address", "limit": 5, "window": 60}},
            {"page_cache": {"paths": ["/products/"]}},
            {"viewed_items": {"flush_interval": 0.02}},
            "cart",
        ],
    )
    upstream.reply_headers("/add", ("X-Session-Cart-Add", "sku=a; qty=2; price=0.15"))
    assert (await gw.get("/add")).status == 200
    first = await gw.get("/products/a")
    hit = await gw.get("/products/a")
    assert (first.headers["X-Cache"], hit.headers["X-Cache"]) == ("MISS", "HIT")
    # The hit was rate limited and counted as a view, though no backend saw it.
    assert hit.headers["RateLimit-Remaining"] == "2"
    await wait_for(lambda: rdb.zscore("viewed:ranking", "a") == 2)
    assert upstream.last.header("X-Session-Cart-Total") == "0.30"
    assert [r.raw_path for r in upstream.received] == ["/add", "/products/a"]
    assert [(await gw.get("/x")).status for _ in range(2)] == [200, 200]
    assert (await gw.get("/products/a")).status == 429  # limit reached, cache or not


class LegacySource(Plugin):
    """A session source: a visitor carrying the legacy app's cookie ``legacy=<uid>``
    without a gateway session gets one with that user id."""

    seen = 0

    async def find_session(self, ctx: RequestContext) -> dict[str, str] | None:
        LegacySource.seen += 1
        legacy = ctx.request.cookies.get("legacy")
        return {"user_id": legacy, "username": f"u{legacy}"} if legacy else None


async def test_a_plugin_session_source_is_asked_after_the_gateway_and_adopted(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    LegacySource.seen = 0
    gw = await make_gateway(plugins=["tests.plugins.test_chain:LegacySource"])
    resp = await gw.get("/page", headers={"Cookie": "legacy=77"})
    assert resp.status == 200
    assert upstream.last.header("X-Session-User-Id") == "77"
    assert upstream.last.header("X-Session-Authenticated") == "true"
    token = resp.cookies["sid"].value
    # From now on the gateway's own session answers: the source is not asked again.
    gw.session.cookie_jar.clear()
    await gw.get("/page", headers={"Cookie": f"sid={token}; legacy=77"})
    assert upstream.last.header("X-Session-Username") == "u77"
    assert LegacySource.seen == 1
    assert any(k.startswith("session:") for k in rdb.keys("session:*"))
    assert rdb.smembers("user_sessions:77")
    # No legacy cookie: the source finds nothing, the visitor stays anonymous.
    gw.session.cookie_jar.clear()
    await gw.get("/page")
    assert upstream.last.header("X-Session-Authenticated") == "false"
