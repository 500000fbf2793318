"""Helpers for tests: the gateway's own test server, and a context to call one plugin
hook at a time without starting anything."""

from __future__ import annotations

import time
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from multidict import CIMultiDict

from .config import RouteSettings, Settings, parse_settings
from .plugin import Plugin, RequestContext, Services
from .redis import Keys, make_client, public_id
from .redis.scripts import BoundScript, Script
from .server import GatewayRunner
from .sessions.model import Session, new_token, ts

P = TypeVar("P", bound=Plugin)


class GatewayTestServer(TestServer):
    """aiohttp's TestServer on the gateway's own server (limits and all), as in
    production. Handler options still come from ``start_server(**server_kwargs(...))``."""

    def __init__(self, app: web.Application, settings: Settings, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.settings = settings

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        # TestServer's extension point for the runner it starts.
        return GatewayRunner(self.app, self.settings, **kwargs)


# -- plugin hooks, one at a time (mitmproxy's taddons.context() is the model) -------------


def settings_for_tests(**over: Any) -> Settings:
    """Minimal valid settings (one upstream, one route) with ``over`` applied."""
    raw: dict[str, Any] = {
        "redis": {"url": "redis://127.0.0.1:1/0"},
        "upstreams": {"app": {"servers": ["http://127.0.0.1:1"]}},
        "routes": [{"path": "/", "upstream": "app"}],
    }
    raw.update(over)
    return parse_settings(raw)


def services(settings: Settings | None = None, redis_url: str | None = None) -> Services:
    """What the core lends a plugin, on a client for ``redis_url`` (never contacted
    unless a hook calls Redis)."""
    settings = settings or settings_for_tests()
    keys = Keys(settings.session.key_prefix)
    client = make_client(redis_url or settings.redis.url, settings.redis)
    return Services(
        settings,
        client,
        keys,
        settings.redis.timeout,
        lambda source: BoundScript(Script(source), client.execute_command),
    )


def plugin(cls: type[P], options: dict[str, Any] | None = None, svc: Services | None = None) -> P:
    """A plugin instance with validated ``options``, as the chain builds it (its
    ``startup`` is the caller's to await when the hooks need it)."""
    p = cls(cls.Config.model_validate(options or {}), svc or services())
    return p


def context(
    method: str = "GET",
    path: str = "/",
    *,
    headers: dict[str, str] | None = None,
    route: RouteSettings | None = None,
    session: Session | None = None,
    client_address: str = "127.0.0.1",
) -> RequestContext:
    """A request context for calling one hook directly: a mocked aiohttp request (no
    server, no socket), the canonical path as given."""
    request = make_mocked_request(method, path, headers=CIMultiDict(headers or {}))
    target = path
    return RequestContext(
        request=request,
        route=route or RouteSettings(path="/", upstream="app"),
        request_id="test-request-id",
        path=path.partition("?")[0],
        target=target,
        client_address=client_address,
        session=session,
    )


def session(user_id: str | None = None, **fields: str) -> Session:
    """A session object (not stored anywhere) for a hook to see."""
    token = new_token()
    now = time.time()
    stored = {"login_time": ts(now), "last_activity": ts(now), "page_views": "0", **fields}
    if user_id is not None:
        stored["user_id"] = user_id
    return Session(token, public_id(token), public_id(token), stored, now + 3600)
