"""`make demo`: the whole walk (guest cart, a login merging it into the user's cart, one
cart on two devices, the inspector, logout everywhere, a product page served from the page
cache, then a clean Redis) must pass against the real gateway, embedded Redis and the Fake
Web Retailer; it then serves until Ctrl-C, which stops it at any moment with one line."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.fake_web_retailer.demo import STOPPED

ROOT = Path(__file__).resolve().parent.parent
DEMO = [sys.executable, "-m", "examples.fake_web_retailer.demo"]


def test_demo_walk_passes_end_to_end(tmp_path: Path) -> None:
    r = subprocess.run(
        [*DEMO, "--once", "--port", "0", "--data-dir", str(tmp_path)],
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
    assert "1 item from your earlier visit was added to your cart." in r.stdout
    assert "Redis is empty again, as before the walk" in r.stdout
    # The operations walk (issue 13): both workers' metrics, the admin API's logout
    # everywhere, readiness with Redis down and back, health, a reload under load.
    assert "gateway_worker_processes 2" in r.stdout
    assert "browser 2's next page: the shop sees a guest" in r.stdout
    assert "/readyz 503: failed ['redis']" in r.stdout and "/readyz 200 again" in r.stdout
    assert "gateway ready      ready" in r.stdout
    assert "during the reload: 0 failed" in r.stdout
    assert r.stdout.rstrip().endswith(STOPPED)


_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_demo_left_behind() -> Iterator[None]:
    """A test that fails before it interrupts its demo must not leave it running (with
    its gateway, shop and Redis)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*DEMO, "--port", "0", "--data-dir", str(tmp_path), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    _STARTED.append(proc)
    return proc


def interrupt(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    return out


@pytest.mark.parametrize("after", [0.3, 1.0])
def test_ctrl_c_while_starting_stops_with_one_line(tmp_path: Path, after: float) -> None:
    proc = start(tmp_path)
    time.sleep(after)
    out = interrupt(proc)
    assert "Traceback" not in out, out
    assert out.rstrip().endswith(STOPPED), out
    assert out.count(STOPPED) == 1, out
    assert proc.returncode in (130, 0), out
    assert not (tmp_path / "redis" / "redis.sock").exists()  # redis stopped


def test_the_url_comes_last_and_ctrl_c_stops_the_serving_demo(tmp_path: Path) -> None:
    proc = start(tmp_path)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("  Ctrl-C stops everything."):
            break
    text = "".join(lines)
    assert "The demo is ready: open http://127.0.0.1:" in text, text
    # Nothing of the walk comes after the address: its verdict comes first. (Whether
    # the walk passes is test_demo_walk_passes_end_to_end's question; a CI run once saw
    # this walk fail a step it did not show, so the verdict is printed here if it fails.)
    verdicts = [v for v in ("All steps passed.", "DEMO FAILED at step") if v in text]
    assert verdicts, text
    assert text.index(verdicts[0]) < text.index("The demo is ready"), text
    if verdicts[0] != "All steps passed.":
        print(text)
    out = interrupt(proc)
    assert "Traceback" not in out, out
    assert out.strip().splitlines()[-1] == STOPPED, out
    assert proc.returncode == 130


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [*DEMO, "--once", "--port", str(port), "--data-dir", str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"error: port {port} on 127.0.0.1 is in use; pick another, e.g. "
        f"make demo ARGS='--port {port + 1}'"
    )
