"""Fixtures for the operations tests (issue 13): the admin listener of an in-process
gateway, on the same runtime, as serve() builds it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.admin import build_admin_app
from gateway.app import RUNTIME
from gateway.runtime import Runtime

AdminFactory = Callable[[TestClient], Awaitable[TestClient]]
ADMIN_TOKEN = "test-admin-token-0123456789"


def runtime_of(gateway: TestClient) -> Runtime:
    server = gateway.server
    assert isinstance(server, TestServer)
    return server.app[RUNTIME]


@pytest.fixture
async def make_admin(make_gateway: object) -> AsyncIterator[AdminFactory]:
    """``await make_admin(gateway_client)`` → a TestClient on that gateway's admin app.
    Depends on make_gateway so that it is torn down first."""
    clients: list[TestClient] = []

    async def factory(gateway: TestClient) -> TestClient:
        client = TestClient(TestServer(build_admin_app(runtime_of(gateway)), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for c in clients:
        await c.close()
