"""`make migrate-demo`: the shop in legacy mode with users logged in, then the gateway in
front at 10 %, 100 % (with a rollback drill at 0 %), Redis only, cut over. No one may be
logged out, and the last two phases must write nothing to the sessions table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_migrate_demo_logs_no_one_out_and_ends_with_zero_writes(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.fake_web_retailer.migrate_demo",
            "--phase-seconds",
            "3",
            "--browsers",
            "8",
            "--data-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert "No one was logged out; the database's session writes fell to zero." in out
    rates = [int(m) for m in re.findall(r"^  \d .+? +(\d+) +\d+/\d+$", out, re.MULTILINE)]
    assert len(rates) == 5, out
    assert rates[0] > 0 and rates[3:] == [0, 0], out
    assert "8/8 browsers" not in out  # the drill also checks the 3 gateway logins
    assert re.search(r"rollback drill: .*: 11/11 browsers still logged in", out), out
    assert "sessions imported" in out  # migrate status, in phase 3
