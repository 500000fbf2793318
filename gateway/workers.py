"""Several worker processes on one port.

The gateway keeps no state between requests beyond a write-behind buffer per process, so
scaling out on one host is N identical processes sharing the listen socket through
SO_REUSEPORT (the kernel spreads connections). The supervisor starts them, forwards
SIGTERM/SIGINT (and SIGHUP, a reload), waits for each to drain and flush, and owns the
embedded Redis if there is one, so it outlives every worker's final flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from .config import Settings
from .metrics_export import WorkerMetrics
from .redis import start_embedded

log = logging.getLogger("gateway.workers")


async def _supervise(settings: Settings, argv: list[str], workers: int) -> int:
    url, embedded = await start_embedded(settings.redis)
    # Every worker's metrics, summed on worker 0's /metrics.
    shared_metrics = WorkerMetrics()
    children: list[asyncio.subprocess.Process] = []
    codes: list[int] = []
    try:
        for i in range(workers):
            children.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "gateway",
                    *argv,
                    "--worker-index",
                    str(i),
                    # The URL may carry a password: the environment, not argv (ps).
                    env={
                        **os.environ,
                        "GATEWAY_WORKER_REDIS_URL": url,
                        **shared_metrics.env(),
                    },
                )
            )
        loop = asyncio.get_running_loop()

        def forward(sig: signal.Signals) -> None:
            for c in children:
                if c.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        c.send_signal(sig)

        # SIGHUP: each worker reloads the config file itself (reload.py).
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, forward, sig)
        log.info("supervising %d workers", workers)
        codes = await asyncio.gather(*(c.wait() for c in children))
    finally:
        for c in children:
            if c.returncode is None:
                c.kill()
                await c.wait()
        if embedded is not None:
            await embedded.stop()
        shared_metrics.close()
    bad = [(i, code) for i, code in enumerate(codes) if code != 0]
    for i, code in bad:
        log.error("worker %d exited with status %d", i, code)
    return 1 if bad else 0


def supervise(settings: Settings, workers: int, argv: list[str]) -> int:
    # The children get the same arguments (and re-read the same file); --worker-index
    # makes each one serve instead of supervising again.
    return asyncio.run(_supervise(settings, argv, workers))
