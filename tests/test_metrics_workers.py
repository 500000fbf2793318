"""With workers, /metrics (served by worker 0) shows every worker's counters summed
(prometheus-client's multiprocess mode); without, the process's own, as before."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics_export import ENV, WorkerMetrics

from .conftest import RedisServer, base_config, start_backend


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(text: str, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in samples(text).items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


async def _backend(request: Any) -> Any:
    from aiohttp import web

    return web.Response(text="ok")


def test_both_workers_counters_are_summed(gateway_process: Any, redis_server: RedisServer) -> None:
    async def scenario() -> None:
        runner, url = await start_backend(_backend)
        cfg = base_config(redis_server.url, url)
        cfg["workers"] = 2
        gp = await asyncio.to_thread(gateway_process, cfg)
        await asyncio.sleep(1.0)  # both workers listening
        metrics_url = f"http://127.0.0.1:{gp.admin_port}/metrics"
        async with aiohttp.ClientSession() as s:
            async with s.get(metrics_url) as r:
                before = total(await r.text(), "gateway_requests_total", route="/static/")
            workers: set[str] = set()
            n = 60
            for i in range(n):
                # A new connection each time, so the kernel spreads them over workers.
                async with aiohttp.ClientSession() as one:
                    async with one.get(gp.url + f"/static/{i}") as resp:
                        assert resp.status == 200
                        workers.add(resp.headers["X-Request-Id"][:16])
            assert len(workers) == 2, "both workers answered (request id prefixes)"
            async with s.get(metrics_url) as r:
                text = await r.text()
        assert total(text, "gateway_requests_total", route="/static/") - before == n
        assert total(text, "gateway_request_seconds_count") >= n
        assert total(text, "gateway_worker_processes") == 2
        assert total(text, "gateway_redis_pool_max_connections") == 2 * 64
        gp.proc.send_signal(15)
        assert await asyncio.to_thread(gp.proc.wait, 30) == 0, gp.log()
        await runner.cleanup()

    asyncio.run(scenario())


def test_single_process_serves_its_own_registry(
    gateway_process: Any, redis_server: RedisServer
) -> None:
    async def scenario() -> None:
        runner, url = await start_backend(_backend)
        gp = await asyncio.to_thread(gateway_process, base_config(redis_server.url, url))
        async with aiohttp.ClientSession() as s:
            async with s.get(gp.url + "/static/a") as r:
                assert r.status == 200
            async with s.get(f"http://127.0.0.1:{gp.admin_port}/metrics") as r:
                text = await r.text()
        assert total(text, "gateway_requests_total", route="/static/") == 1
        # The process collector of the default registry: not there in multiprocess mode.
        assert "process_cpu_seconds_total" in text
        assert total(text, "gateway_worker_processes") == 1
        gp.proc.send_signal(15)
        assert await asyncio.to_thread(gp.proc.wait, 30) == 0
        await runner.cleanup()

    asyncio.run(scenario())


def test_worker_metrics_directory(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv(ENV, raising=False)
    own = WorkerMetrics()
    assert own.path.is_dir() and own.env() == {ENV: str(own.path)}
    own.close()
    assert not own.path.exists()

    # A directory given by the operator: emptied of metric files, never removed.
    given = tmp_path / "metrics"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"old")
    (given / "keep.txt").write_text("x")
    monkeypatch.setenv(ENV, str(given))
    theirs = WorkerMetrics()
    assert not (given / "counter_123.db").exists() and (given / "keep.txt").exists()
    theirs.close()
    assert given.is_dir()
    assert os.environ[ENV] == str(given)
