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
