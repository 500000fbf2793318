"""Metrics from every worker: prometheus-client's multiprocess mode.

With ``workers: N`` each worker is its own process with its own counters. The supervisor
gives its children a directory in ``PROMETHEUS_MULTIPROC_DIR`` (before they start, so
before they import prometheus_client, which reads it at import); every worker then
writes its values to memory-mapped files there, and the process serving ``/metrics``
(worker 0) reads them all: counters and histograms summed, gauges combined as each one's
``multiprocess_mode`` says (metrics.py). Without the variable (one process) ``/metrics``
is the process's own registry, as before.

A worker that ends should be reported with :func:`worker_exited` (its ``live*`` gauges
then stop counting); its counters stay in the sum, as a Prometheus user expects of a
counter.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, multiprocess

ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The directory this process writes its metrics to, when in multiprocess mode."""
    return os.environ.get(ENV) or None


def exposition() -> bytes:
    """The text for ``/metrics``: every worker's values combined, or this process's."""
    if multiprocess_dir() is None:
        return generate_latest()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


class WorkerMetrics:
    """The supervisor's side: the directory its workers share, emptied at start (files
    left by an earlier run would add its counts) and removed at the end if it made it."""

    def __init__(self) -> None:
        given = os.environ.get(ENV)
        if given:
            # Someone else's directory (their own supervisor, a mounted volume): only
            # the files of the metrics themselves are removed, never the directory.
            self.path = Path(given)
            self._owned = False
            self.path.mkdir(parents=True, exist_ok=True)
            for f in self.path.glob("*.db"):
                f.unlink(missing_ok=True)
        else:
            self.path = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
            self._owned = True

    def env(self) -> dict[str, str]:
        """What the workers' environment needs."""
        return {ENV: str(self.path)}

    def worker_exited(self, pid: int) -> None:
        multiprocess.mark_process_dead(pid, str(self.path))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self._owned:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.path)
