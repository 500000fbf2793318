"""The admin listener (``admin.listen``): liveness, readiness, Prometheus metrics and the
admin API, on their own port so that no route of the proxied application can shadow
them and they need not be exposed publicly. Fed by the runtime, never by the proxy
app's state.

- ``/healthz``: the process answers (liveness: it never asks Redis, so an orchestrator
  does not restart gateways because Redis is down).
- ``/readyz``: 200 when Redis takes a write and an upstream server a connection, 503
  with the failed check named otherwise (readiness.py).
- ``/metrics``: every worker's metrics (metrics_export.py).
- ``/admin/...``: the admin API when ``admin.token`` is set (admin_api.py).

With workers only worker 0 serves it; it also counts the keys in Redis
(population.py).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .admin_api import build_api
from .metrics_export import exposition
from .population import PopulationSampler
from .readiness import Readiness
from .runtime import Runtime

_RUNTIME = web.AppKey("admin_runtime", Runtime)
_READINESS = web.AppKey("admin_readiness", Readiness)


async def _healthz(request: web.Request) -> web.Response:
    rt = request.app[_RUNTIME]
    return web.json_response(
        {
            "status": "ok",
            "pid": os.getpid(),
            "activity_pending": rt.sessions.activity.pending_count(),
        }
    )


async def _readyz(request: web.Request) -> web.Response:
    ready, doc = await request.app[_READINESS].check()
    return web.json_response(doc, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _population(app: web.Application) -> AsyncIterator[None]:
    rt = app[_RUNTIME]
    sampler = PopulationSampler(
        rt.redis.client,
        rt.redis.keys,
        rt.settings.admin.population_interval,
        rt.redis.timeout,
    )
    sampler.start()
    yield
    await sampler.stop()


def build_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[_RUNTIME] = runtime
    app[_READINESS] = Readiness(runtime)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    token = runtime.settings.admin.token
    if token is not None:
        app.add_subapp("/admin/", build_api(runtime, token.get_secret_value()))
    app.cleanup_ctx.append(_population)
    return app
