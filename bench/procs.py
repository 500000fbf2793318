"""Child processes, ports, CPU pinning, RSS sampling and system packages."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def log(msg: str) -> None:
    """Progress line; flushed so `make bench | tee` shows it while the run is going."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    # Bind to port 0 so the kernel picks an unused loopback port; a tiny race with other
    # programs is acceptable for a benchmark (start-up fails loudly if it happens).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the load generator and the system under test run on.

    On a 2-core machine wrk and the proxy would otherwise fight over both cores and the
    numbers would mostly measure the scheduler; pinning gives the load generator one core
    and every server (backend, proxy, Redis) the other, identically in every scenario.
    """

    load_cpus: str | None
    server_cpus: str | None

    @classmethod
    def choose(cls, enabled: bool) -> Pinning:
        n = os.cpu_count() or 1
        if not enabled or n < 2 or shutil.which("taskset") is None:
            return cls(None, None)
        return cls("0", "1" if n == 2 else f"1-{n - 1}")

    def load_threads(self) -> int:
        if self.load_cpus is None:
            return max(1, min(2, os.cpu_count() or 1))
        return 1 if "-" not in self.load_cpus else 2

    def wrap(self, cmd: Sequence[str], cpus: str | None) -> list[str]:
        return ["taskset", "-c", cpus, *cmd] if cpus else list(cmd)

    def describe(self) -> str:
        if self.load_cpus is None:
            return "not pinned (load generator and servers share all CPUs)"
        return (
            f"load generator on CPU {self.load_cpus}; backend, proxies and Redis on CPU "
            f"{self.server_cpus} (taskset)"
        )


@dataclass
class Child:
    """A child process whose output goes to a log file we can show when it fails."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)


@dataclass
class Children:
    """Every process the harness started, stopped in reverse order on the way out."""

    items: list[Child] = field(default_factory=list)

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        log_path = log_dir / f"{name}.log"
        fh = log_path.open("wb")
        proc = subprocess.Popen(
            list(cmd),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=str(cwd or ROOT),
        )
        fh.close()
        child = Child(name, proc, log_path)
        self.items.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.items:
            self.items.remove(child)

    def stop_all(self) -> None:
        for child in reversed(self.items):
            with contextlib.suppress(Exception):
                child.stop()
        self.items.clear()


class HarnessError(RuntimeError):
    """The harness itself failed (a process didn't start, a scenario was all errors)."""


def wait_port(child: Child, port: int, timeout: float = 15.0) -> None:
    """Block until something accepts on 127.0.0.1:port, or fail with the child's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise HarnessError(
                f"{child.name} exited with status {child.proc.returncode}:\n{child.tail()}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise HarnessError(f"{child.name} did not listen on port {port} in {timeout:.0f} s")


def start_redis(children: Children, log_dir: Path, pin: Pinning, name: str) -> tuple[Child, int]:
    """A private, non-persistent redis-server on a free loopback port."""
    port = free_port()
    cmd = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--daemonize", "no", "--dir", str(log_dir),
    ]  # fmt: skip
    child = children.start(name, pin.wrap(cmd, pin.server_cpus), log_dir)
    wait_port(child, port)
    return child, port


def start_backend(children: Children, log_dir: Path, pin: Pinning) -> tuple[Child, int]:
    """The fast backend (bench/backend.py) on the server CPUs and a free port."""
    port = free_port()
    cmd = [PYTHON, "-m", "bench.backend", "--port", str(port)]
    child = children.start("backend", pin.wrap(cmd, pin.server_cpus), log_dir)
    wait_port(child, port)
    return child, port


def _descendants(pid: int) -> list[int]:
    # One pass over /proc: the gateway (or nginx) may run workers as children, and their
    # memory is the proxy's memory too.
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def rss_kib(pid: int) -> int:
    """VmRSS of a process and all its descendants, in KiB (0 if it is gone)."""
    total = 0
    for p in _descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pids: Sequence[int], *, system_only: bool = False) -> float:
    """utime+stime of the given processes (stime alone: ``system_only``), from
    /proc/<pid>/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (0 if system_only else int(fields[11])) + int(fields[12])
    return total / tick


class RssSampler:
    """Peak RSS of a process tree, sampled every 100 ms while a measurement runs."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        assert self.pid is not None
        while True:
            self.peak_kib = max(self.peak_kib, rss_kib(self.pid))
            await asyncio.sleep(0.1)

    async def __aenter__(self) -> RssSampler:
        if self.pid is not None:
            self.peak_kib = rss_kib(self.pid)
            self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self.peak_kib = max(self.peak_kib, rss_kib(self.pid or 0))


def ensure_system_package(binary: str, package: str) -> str | None:
    """Install a missing tool with apt-get, printing what it does.

    Returns None when the binary is available, else the reason it could not be installed.
    Bounded by timeouts so a broken mirror cannot hang the run.
    """
    if shutil.which(binary):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{binary} is not installed and apt-get (as root) is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd, limit in (
        (["apt-get", "update", "-qq"], 300),
        (["apt-get", "install", "-y", "-qq", package], 300),
    ):
        log(f"{binary} not found; running: {' '.join(cmd)}")
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out after {limit} s"
        if res.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {res.stderr.strip()[-300:]}"
    if shutil.which(binary) is None:
        return f"apt-get install {package} did not provide {binary}"
    log(f"installed {package}")
    return None
