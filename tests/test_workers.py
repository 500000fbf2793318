"""The worker supervisor (gateway/workers.py): a crashed worker is started again after
a back-off, and SIGTERM drains every worker."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from .conftest import RedisServer, Upstream, base_config, start_backend


def children(pid: int) -> set[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in text.split()}


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def test_a_crashed_worker_is_restarted_and_sigterm_drains_all(
    gateway_process: Any, redis_server: RedisServer
) -> None:
    async def scenario() -> None:
        runner, url = await start_backend(_ok)
        cfg = base_config(redis_server.url, url)
        cfg["workers"] = 2
        gp = await asyncio.to_thread(gateway_process, cfg)
        deadline = time.monotonic() + 15
        while len(children(gp.proc.pid)) < 2:
            assert time.monotonic() < deadline, gp.log()
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # both workers listening
        first = children(gp.proc.pid)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        async with aiohttp.ClientSession() as s:
            # The other worker answers meanwhile; a new one takes the dead one's place.
            while True:
                async with aiohttp.ClientSession() as one:
                    async with one.get(gp.url + "/static/x") as resp:
                        assert resp.status == 200
                now = children(gp.proc.pid)
                if len(now) == 2 and victim not in now:
                    (new,) = now - first
                    if f"pid {new})" in gp.log():  # listening
                        break
                assert time.monotonic() < deadline + 15, gp.log()
                await asyncio.sleep(0.1)
            for _ in range(10):
                async with s.get(gp.url + "/static/y") as resp:
                    assert resp.status == 200
        assert f"(pid {victim}) exited with status" in gp.log(), gp.log()
        assert "restarting in" in gp.log()
        workers = children(gp.proc.pid)
        gp.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(gp.proc.wait, 30)
        await runner.cleanup()
        assert rc == 0, gp.log()
        for w in workers:
            assert not Path(f"/proc/{w}").exists() or "zombie" in Path(
                f"/proc/{w}/status"
            ).read_text()

    asyncio.run(scenario())


def test_workers_stop_when_the_supervisor_is_killed(
    gateway_process: Any, redis_server: RedisServer, upstream: Upstream
) -> None:
    """A supervisor killed outright (SIGKILL, the OOM killer) leaves no worker serving
    on its own: each gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and drains."""
    cfg = base_config(redis_server.url, upstream.url, workers=2)
    gp = gateway_process(cfg)
    deadline = time.monotonic() + 15
    workers: list[int] = []
    while time.monotonic() < deadline and len(workers) < 2:
        workers = _children(gp.proc.pid)
        time.sleep(0.1)
    assert len(workers) == 2
    os.kill(gp.proc.pid, signal.SIGKILL)
    gp.proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except OSError:
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
