"""Helpers for tests that run the gateway in-process."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from .config import Settings
from .server import GatewayRunner


class GatewayTestServer(TestServer):
    """aiohttp's TestServer on the gateway's own server (limits and all), as in
    production. Handler options still come from ``start_server(**server_kwargs(...))``."""

    def __init__(self, app: web.Application, settings: Settings, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.settings = settings

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        # TestServer's extension point for the runner it starts.
        return GatewayRunner(self.app, self.settings, **kwargs)
