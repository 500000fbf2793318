"""`make demo ARGS=--once`: the whole walk (guest cart, login keeps it, logout, a product
page served from the page cache) must pass against the real gateway, embedded Redis and
the Fake Web Retailer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_walk_passes_end_to_end(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.fake_web_retailer.demo",
            "--once",
            "--data-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "All steps passed." in r.stdout
    assert "0 session writes" in r.stdout
    assert "X-Cache: MISS" in r.stdout and "X-Cache: HIT" in r.stdout
    assert "viewed:ranking (zset" in r.stdout
    # The operations walk (issue 13): both workers' metrics, the admin API's logout
    # everywhere, readiness with Redis down and back, health, a reload under load.
    assert "gateway_worker_processes 2" in r.stdout
    assert "browser 2's next page: the shop sees a guest" in r.stdout
    assert "/readyz 503: failed ['redis']" in r.stdout and "/readyz 200 again" in r.stdout
    assert "gateway ready      ready" in r.stdout
    assert "during the reload: 0 failed" in r.stdout
