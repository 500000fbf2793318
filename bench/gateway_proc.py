"""Scenarios d, e and f: the gateway's config and process.

The gateway is being written alongside this harness; its config schema may gain keys,
so everything the harness assumes about it lives in `gateway_config` below.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from bench.procs import PYTHON, ROOT, Child, Children, HarnessError, Pinning, wait_port


def gateway_config(
    port: int,
    redis_port: int,
    backend_port: int,
    instructions_all: list[str] | None = None,
    *,
    admin_port: int | None = None,
    workers: int = 1,
    max_connections: int | None = None,
) -> dict[str, Any]:
    """config.yaml for the benchmark, following DESIGN.md's contract keys.

    `admin_port` adds the admin listener (/metrics, /healthz; with workers > 1 only
    worker 0 serves it); `workers` > 1 runs that many processes on one port;
    `max_connections` raises the per-process client connection cap (idle test).
    """
    extra: dict[str, Any] = {}
    if workers > 1:
        extra["workers"] = workers
    if admin_port is not None:
        extra["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
    return {
        "listen": f"127.0.0.1:{port}",
        **extra,
        "redis": {"url": f"redis://127.0.0.1:{redis_port}/0"},
        "session": {
            "cookie": {"name": "sid", "secure": False},
            "idle_ttl": 3600,
            "absolute_ttl": 28800,
        },
        "upstreams": {"app": {"servers": [f"http://127.0.0.1:{backend_port}"]}},
        # Every benchmark client is one loopback address: the per-address cap on upstream
        # connections (default 32) would refuse wrk's 64 connections as one client.
        "limits": {
            "upstream_per_address": 100_000,
            **({"max_connections": max_connections} if max_connections else {}),
        },
        "routes": [
            {"path": "/nosession/", "upstream": "app", "session": "none"},
            {"path": "/login", "upstream": "app", "session": "optional", "instructions": ["login"]},
            {
                "path": "/",
                "upstream": "app",
                "session": "optional",
                **({"instructions": instructions_all} if instructions_all else {}),
            },
        ],
    }


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def gateway_available(tmp: Path) -> str | None:
    """None if `python -m gateway --config X --check` accepts our config, else why not."""
    if not (ROOT / "gateway" / "__main__.py").exists():
        return "gateway/__main__.py does not exist yet"
    cfg = write_config(tmp / "gateway-check.yaml", gateway_config(8080, 6399, 9000))
    try:
        res = subprocess.run(
            [PYTHON, "-m", "gateway", "--config", str(cfg), "--check"],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "`python -m gateway --check` did not finish in 30 s"
    if res.returncode != 0:
        return f"`python -m gateway --check` exited {res.returncode}: " + (
            (res.stderr or res.stdout).strip().splitlines() or [""]
        )[-1]
    return None


def start_gateway(
    children: Children,
    tmp: Path,
    pin: Pinning,
    name: str,
    cfg: dict[str, Any],
    port: int,
    *,
    unpinned: bool = False,
    root: Path | None = None,
) -> Child:
    """Start the gateway on the server CPU set (worker processes inherit the affinity),
    or with `unpinned` on every CPU (then it also competes with the load generator).
    `root`: run the gateway package of another checkout (bench.cpu's before/after)."""
    path = write_config(tmp / f"{name}.yaml", cfg)
    cpus = None if unpinned else pin.server_cpus
    child = children.start(
        name, pin.wrap([PYTHON, "-m", "gateway", "--config", str(path)], cpus), tmp, cwd=root
    )
    wait_port(child, port, timeout=30)
    return child


def gateway_started_ok(child: Child) -> None:
    if child.proc.poll() is not None:
        raise HarnessError(f"{child.name} exited: {child.tail()}")
