"""`python -m bench --smoke` end to end: every scenario runs and the results are written.

Performance targets are never asserted here (this machine is shared and small); only that
the harness works: every scenario ran, every session scenario passed its proof of work,
the targets were evaluated (pass or fail, never asserted). Skipped only when wrk, or the
OpenResty peer's Debian packages (nginx-light, libnginx-mod-http-lua, lua-resty-core),
are missing and cannot be installed: the test installs them itself with apt-get (as
`python -m bench` would), so `make test` needs no extra system-deps step for them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.openresty import ensure_openresty
from bench.procs import ensure_system_package

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_smoke(tmp_path: Path) -> None:
    why = ensure_system_package("wrk", "wrk")
    if why:
        pytest.skip(f"wrk is needed for the benchmark and could not be installed: {why}")
    why = ensure_openresty()
    if why:
        pytest.skip(f"the OpenResty peer's packages could not be installed: {why}")
    out = tmp_path / "results"
    try:
        res = subprocess.run(
            [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"bench --smoke took over 300 s:\n{(e.stdout or b'')[-3000:]!r}")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    data = json.loads((out / "latest.json").read_text())
    for key in report.SCENARIOS:
        scenario = data["scenarios"].get(key, {})
        assert scenario.get("requests", 0) > 0, f"scenario {key}: {scenario}"
        # CPU per request of every process involved, from /proc.
        assert scenario["proxy_cpu_us" if key != "a" else "backend_cpu_us"] > 0, key
    for key in report.SESSION_SCENARIOS:
        proof = data["scenarios"][key]["proof"]
        assert proof["passed"], f"scenario {key}: {proof}"
        assert proof["seen_user_id"] == proof["expected_user_id"], proof
        assert data["scenarios"][key]["redis_cpu_us"] >= 0
    for key in report.FIXED_RATE:
        assert data["fixed_rate"][key]["requests"] > 0, f"fixed rate {key}"
    # Smoke sizes: 500 sessions written into Redis for the *-100k scenarios, 300 idle
    # connections, each answered 200, and a new request answered while they were open.
    assert data["plan"]["sessions_large"] == 500
    for d in data["idle"].values():
        assert d["answered_200"] == d["connections"] == 300, d
        assert d["probe_status"] == 200, d
    targets = {t["target"]: t["result"] for t in data["targets16"]}
    assert len(targets) == 12, targets  # 5 per session count (one is the f/o2 info row) + 2
    assert all(r != "n/a" for r in targets.values()), targets
    for key in "cdef":
        # Both Redis figures are reported: sent by the proxy and executed by Redis.
        scenario = data["scenarios"][key]
        assert scenario["redis_sent_per_req"] is not None, f"scenario {key}: {scenario}"
        assert scenario["redis_executed_per_req"] >= scenario["redis_sent_per_req"]
    assert data["load_6k"]["requests"] > 0
    for key in ("e", "f"):
        assert data["load_tests"][key]["requests"] > 0, f"load test {key}"
    assert data["memory"]["sessions"] == 2_000
    md = (out / "latest.md").read_text()
    assert md.startswith("# Session Gateway benchmark")
    assert "## Targets (issue 16)" in md and "o. OpenResty peer" in md
    assert "o2-100k. OpenResty peer, 2 workers, 100k sessions" in md
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
        for k in ("gateway_us", "gateway_sys_us", "backend_us", "redis_us"):
            assert isinstance(r[k], int | float) and r[k] >= 0, r
    assert rows[0]["hgetall"] == 0  # d reads no session


def test_bench_hotpath_smoke() -> None:
    """`python -m bench.hotpath` (in-process session work, no I/O) runs and reports."""
    res = subprocess.run(
        [sys.executable, "-m", "bench.hotpath", "--rounds", "1", "--requests", "100"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "session work per request on a hit: min " in res.stdout


def test_bench_profile_charges_each_sample_to_its_part(tmp_path: Path) -> None:
    """`python -m bench.profile` on py-spy raw stacks: a socket syscall is the kernel's
    whatever Python called it; otherwise the innermost Python frame's file decides, past
    native frames of the interpreter; shares and µs per request add up."""
    from bench.profile import part_of, summarize

    run = "_run (asyncio/events.py:80);Gateway._handle (gateway/proxy.py:120)"
    stacks = {
        f"{run};_exchange (gateway/upstream_client.py:330);write (libc.so.6)": 4,
        f"{run};strip_headers (gateway/headers.py:190);Py_DECREF (object.h:500)": 3,
        f"{run};NearCache.get (gateway/sessions/nearcache.py:70)": 2,
        f"{run};RequestHandler.start (aiohttp/web_protocol.py:600);read (libc.so.6)": 1,
    }
    f = tmp_path / "e.txt"
    f.write_text("".join(f"{s} {n}\n" for s, n in stacks.items()))
    parts, total = summarize(f)
    assert total == 10
    assert parts == {
        "kernel: socket write": 4,
        "headers in/out": 3,
        "sessions + Redis": 2,
        "kernel: socket read": 1,
    }
    assert part_of(["Runner.run (asyncio/runners.py:118)", "epoll_pwait (libc.so.6)"]) == (
        "event loop"
    )
    res = subprocess.run(
        [sys.executable, "-m", "bench.profile", str(f), str(f), "--us", "100,50"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "| kernel: socket write | 40.0 | 40 | 40.0 | 20 |" in res.stdout
