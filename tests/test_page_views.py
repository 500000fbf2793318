"""What counts as activity (activity.* rules, gateway/sessions/pageviews.py), and what
the backend's X-Session-* values describe: the session before this request."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from aiohttp import web

from gateway.app import RUNTIME
from gateway.config import ActivitySettings, ConfigError, parse_settings
from gateway.sessions import public_id
from gateway.sessions.pageviews import PageViews

from .conftest import GatewayFactory, RedisServer, Upstream, base_config, login

NO_NEAR_CACHE = {"cookie": {"name": "sid", "secure": False}, "near_cache": {"enabled": False}}


def answer(status: int, **headers: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, text=f"{status}", headers=headers)

    return handler


def test_the_default_rules() -> None:
    pv = PageViews(ActivitySettings())
    assert pv.classify("GET", "/products/laptop-123", 200) == "view"
    assert pv.classify("HEAD", "/", 200) == "view"
    assert pv.classify("GET", "/account", 303) == "view"  # a redirect to the login page
    assert pv.classify("GET", "/nope", 404) is None
    assert pv.classify("GET", "/cart", 500) is None
    assert pv.classify("GET", "/favicon.ico", 200) is None
    assert pv.classify("GET", "/favicon.ico", 404) is None
    assert pv.classify("GET", "/assets/site.CSS", 200) is None
    assert pv.classify("GET", "/img/logo.png", 304) is None
    assert pv.classify("POST", "/cart/add", 303) == "touch"
    assert pv.classify("POST", "/cart/add", 400) is None
    assert pv.classify("GET", "/chat", 101) == "touch"  # a WebSocket opened


def test_the_rules_are_configurable_and_validated() -> None:
    pv = PageViews(
        ActivitySettings(
            count_methods=("get", "post"),
            count_statuses=("2xx", "404"),
            ignore_paths=("/health/", "/ping"),
            static_extensions=(),
        )
    )
    assert pv.classify("POST", "/form", 200) == "view"
    assert pv.classify("GET", "/nope", 404) == "view"
    assert pv.classify("GET", "/moved", 301) is None
    assert pv.classify("GET", "/health/db", 200) is None
    assert pv.classify("GET", "/ping", 200) is None
    assert pv.classify("GET", "/pinger", 200) == "view"
    assert pv.classify("GET", "/site.css", 200) == "view"
    for key, value, why in [
        ("count_statuses", ["2xx", "6xx"], "status classes"),
        ("count_methods", ["GET /"], "HTTP methods"),
        ("ignore_paths", ["favicon.ico"], "starting with /"),
        ("static_extensions", ["css"], "extensions"),
    ]:
        cfg = base_config("redis://127.0.0.1:1/0", "http://127.0.0.1:1")
        cfg["activity"] = {key: value}
        with pytest.raises(ConfigError, match=rf"^activity\.{key}: .*{why}"):
            parse_settings(cfg)


async def test_only_what_a_person_asked_to_see_is_a_page_view(
    make_gateway: GatewayFactory, upstream: Upstream, rdb: redis.Redis
) -> None:
    gw = await make_gateway(session=NO_NEAR_CACHE, activity={"flush_interval": 5})
    activity = gw.server.app[RUNTIME].sessions.activity
    upstream.routes["/missing"] = answer(404)
    upstream.routes["/favicon.ico"] = answer(404)
    upstream.routes["/form"] = answer(303, Location="/a")
    upstream.routes["/moved"] = answer(302, Location="/a")
    upstream.routes["/broken"] = answer(500)
    key = f"session:{public_id(await login(gw, upstream))}"

    async def visit(method: str, path: str) -> dict[str, str]:
        resp = await gw.request(method, path, allow_redirects=False)
        await resp.read()
        await activity.flush()
        return rdb.hgetall(key)  # type: ignore[return-value]

    assert (await visit("GET", "/a"))["current_page"] == "/a"
    for method, path in [
        ("GET", "/missing"),
        ("GET", "/favicon.ico"),
        ("GET", "/css/site.css"),
        ("GET", "/broken"),
        ("GET", "/static/logo"),  # a session: none route
    ]:
        after = await visit(method, path)
        assert (after["current_page"], after["page_views"]) == ("/a", "1"), path

    # A form posted (answered with a redirect) keeps the session alive, but is no page.
    rdb.hset(key, "last_activity", f"{time.time() - 600:.3f}")
    after = await visit("POST", "/form")
    assert float(after["last_activity"]) > time.time() - 5
    assert (after["current_page"], after["page_views"]) == ("/a", "1")
    # A redirect answering a GET is a page view.
    after = await visit("GET", "/moved")
    assert (after["current_page"], after["page_views"]) == ("/moved", "2")


@pytest.mark.parametrize("near_cache", [True, False])
async def test_the_backend_sees_the_session_as_it_was_before_this_request(
    make_gateway: GatewayFactory,
    upstream: Upstream,
    redis_server: RedisServer,
    near_cache: bool,
) -> None:
    cfg = base_config(redis_server.url, upstream.url)
    cfg["session"]["near_cache"] = {"enabled": near_cache}
    # A long flush interval: the next request comes before the activity reaches Redis,
    # which the session read must make up for (near-cache copy or unflushed activity).
    cfg["activity"] = {"flush_interval": 5}
    gw = await make_gateway(cfg)
    upstream.routes["/nope"] = answer(404)
    await login(gw, upstream)

    async def seen(path: str) -> tuple[str | None, str | None]:
        await (await gw.get(path)).read()
        last = [r for r in upstream.received if r.raw_path == path][-1]
        return last.header("X-Session-Current-Page"), last.header("X-Session-Page-Views")

    assert await seen("/a") == (None, "0")  # the login wrote no page
    assert await seen("/b") == ("/a", "1")
    assert await seen("/nope") == ("/b", "2")
    assert await seen("/c") == ("/b", "2")  # the 404 was not counted
    assert await seen("/d") == ("/c", "3")
