"""`python -m bench --smoke` end to end: every scenario runs and the results are written.

Performance targets are never asserted here (this machine is shared and small); only that
the harness works. Skipped only when wrk is missing and cannot be installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.procs import ensure_system_package

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_smoke(tmp_path: Path) -> None:
    why = ensure_system_package("wrk", "wrk")
    if why:
        pytest.skip(f"wrk is needed for the benchmark and could not be installed: {why}")
    out = tmp_path / "results"
    try:
        res = subprocess.run(
            [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"bench --smoke took over 180 s:\n{(e.stdout or b'')[-3000:]!r}")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    data = json.loads((out / "latest.json").read_text())
    for key in "abcdef":
        scenario = data["scenarios"].get(key, {})
        assert scenario.get("requests", 0) > 0, f"scenario {key}: {scenario}"
        assert data["fixed_rate"][key]["requests"] > 0
    for key in "cdef":
        # Both Redis figures are reported: sent by the proxy and executed by Redis.
        scenario = data["scenarios"][key]
        assert scenario["redis_sent_per_req"] is not None, f"scenario {key}: {scenario}"
        assert scenario["redis_executed_per_req"] >= scenario["redis_sent_per_req"]
    assert data["load_6k"]["requests"] > 0
    for key in ("e", "f"):
        assert data["load_tests"][key]["requests"] > 0, f"load test {key}"
    assert data["memory"]["sessions"] == 2_000
    assert (out / "latest.md").read_text().startswith("# Session Gateway benchmark")
    assert (out / "latest.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_cpu_smoke() -> None:
    """`python -m bench.cpu`, the before/after tool, runs d, e and x and reports CPU."""
    why = ensure_system_package("wrk", "wrk")
    if why:
        pytest.skip(f"wrk is needed for the benchmark and could not be installed: {why}")
    cmd = [
        sys.executable, "-m", "bench.cpu", "--dur", "1", "--reps", "1", "--sessions", "20",
        "--connections", "4", "--only", "dex", "--set-x", "routes.2.session_fields=[]",
        "--json",
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert [r["scenario"] for r in rows] == ["d", "e", "x"]
    for r in rows:
        assert r["rps"] > 0 and r["errors"] == 0, r
        # CPU time is counted in clock ticks (10 ms): a second of a busy machine's
        # smoke load can round a process's share to 0. The figures must be there.
        assert r["gateway_us"] >= 0 and r["backend_us"] >= 0 and r["redis_us"] >= 0, r
    assert rows[0]["hgetall"] == 0  # d reads no session


def test_bench_hotpath_smoke() -> None:
    """`python -m bench.hotpath` (in-process session work, no I/O) runs and reports."""
    res = subprocess.run(
        [sys.executable, "-m", "bench.hotpath", "--rounds", "1", "--requests", "100"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "session work per request on a hit: min " in res.stdout
