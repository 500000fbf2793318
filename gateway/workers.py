"""Several worker processes on one port.

The gateway keeps no state between requests beyond a write-behind buffer per process, so
scaling out on one host is N identical processes sharing the listen socket through
SO_REUSEPORT (the kernel spreads connections). The supervisor starts them, restarts one
that dies (after a back-off, so a worker that cannot start does not spin), forwards
SIGTERM/SIGINT (and SIGHUP, a reload), waits for each to drain and flush, and owns the
embedded Redis if there is one, so it outlives every worker's final flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import time

from .config import Settings
from .metrics_export import WorkerMetrics
from .redis import start_embedded

log = logging.getLogger("gateway.workers")

# Seconds before a dead worker is started again: doubled after each death of a worker
# that had run less than STABLE seconds, back to the first step after one that had.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE = 30.0


def _die_with_parent() -> None:
    """In the child, before exec: ask the kernel for SIGTERM when the supervisor dies.
    A supervisor killed outright (SIGKILL, OOM) would otherwise leave its workers
    serving on the port with no one to restart or stop them; SIGTERM lets each drain
    and flush as on a normal stop. Linux only (prctl); elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


_PR_SET_PDEATHSIG = 1


class Supervisor:
    def __init__(
        self, argv: list[str], workers: int, redis_url: str, metrics: WorkerMetrics
    ) -> None:
        self.argv = argv
        self.workers = workers
        self.redis_url = redis_url
        self.metrics = metrics
        self.children: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = asyncio.Event()

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        env = {**os.environ, **self.metrics.env()}
        if self.redis_url:
            # The URL may carry a password: the environment, not argv (ps).
            env["GATEWAY_WORKER_REDIS_URL"] = self.redis_url
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            *self.argv,
            "--worker-index",
            str(index),
            env=env,
            preexec_fn=_die_with_parent,
        )
        self.children[index] = proc
        return proc

    async def _keep(self, index: int) -> int:
        """Run worker ``index`` until the supervisor stops; its last exit status."""
        backoff = BACKOFF_FIRST
        while True:
            started = time.monotonic()
            proc = await self._spawn(index)
            if self.stopping.is_set():
                # SIGTERM came while it was being started: it drains like the others.
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
            # Its gauges no longer count (counters stay summed).
            self.metrics.worker_exited(proc.pid)
            if self.stopping.is_set():
                # A worker still starting when SIGTERM came dies of it before it could
                # handle it: it had nothing to drain.
                return 0 if code in (-signal.SIGTERM, -signal.SIGINT) else code
            ran = time.monotonic() - started
            if ran >= STABLE:
                backoff = BACKOFF_FIRST
            log.error(
                "worker %d (pid %d) exited with status %d after %.1fs; restarting in %.1fs",
                index,
                proc.pid,
                code,
                ran,
                backoff,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
            if self.stopping.is_set():
                return code
            backoff = min(backoff * 2, BACKOFF_MAX)

    def forward(self, sig: signal.Signals) -> None:
        """Pass ``sig`` to every running worker; SIGTERM and SIGINT also stop the
        restarting."""
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.stopping.set()
        for c in self.children.values():
            if c.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    c.send_signal(sig)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # SIGHUP: each worker reloads the config file itself (reload.py).
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.forward, sig)
        log.info("supervising %d workers", self.workers)
        try:
            codes = await asyncio.gather(*(self._keep(i) for i in range(self.workers)))
        finally:
            for c in self.children.values():
                if c.returncode is None:
                    c.kill()
                    await c.wait()
        bad = [(i, code) for i, code in enumerate(codes) if code != 0]
        for i, code in bad:
            log.error("worker %d exited with status %d", i, code)
        return 1 if bad else 0


async def _supervise(settings: Settings, argv: list[str], workers: int) -> int:
    url, embedded = await start_embedded(settings.redis)
    # Every worker's metrics, summed on worker 0's /metrics.
    shared_metrics = WorkerMetrics()
    try:
        return await Supervisor(argv, workers, url, shared_metrics).run()
    finally:
        if embedded is not None:
            await embedded.stop()
        shared_metrics.close()


def supervise(settings: Settings, workers: int, argv: list[str]) -> int:
    # The children get the same arguments (and re-read the same file); --worker-index
    # makes each one serve instead of supervising again.
    return asyncio.run(_supervise(settings, argv, workers))
