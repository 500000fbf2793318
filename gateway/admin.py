"""The admin listener (``admin.listen``): health and Prometheus metrics, on their own
port so that no route of the proxied application can shadow them and they need not be
exposed publicly. Fed by the runtime, never by the proxy app's state."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .errors import REDIS_FAILURES
from .runtime import Runtime

_RUNTIME = web.AppKey("admin_runtime", Runtime)


async def _healthz(request: web.Request) -> web.Response:
    rt = request.app[_RUNTIME]
    started = time.perf_counter()
    try:
        await rt.redis.client.ping()
    except REDIS_FAILURES as e:
        return web.json_response({"status": "degraded", "redis": str(e)}, status=503)
    ms = (time.perf_counter() - started) * 1000
    pending = rt.sessions.activity.pending_count()
    return web.json_response(
        {"status": "ok", "redis_ms": round(ms, 2), "activity_pending": pending}
    )


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[_RUNTIME] = runtime
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app
