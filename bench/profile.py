"""`python -m bench.profile A.txt [B.txt]`: where the gateway's CPU goes, by part.

Reads py-spy profiles in raw (collapsed-stack) format, as `python -m bench.cpu --profile
DIR --native` writes them, and charges each sample to one part of the request path: the
kernel (the socket write or read the sample is in), the event loop, aiohttp's server,
the upstream client, the gateway's own modules by area, metrics, and the rest. With two
files it prints them side by side (a before/after of a change, `--x-root`): the share
of samples, and µs per request when the CPU µs per request of each run is given
(`--us A,B`, from bench.cpu's `gateway_us`).

A sample is charged by its innermost frame that says something: a native socket call
(write/read/send/recv in libc) is the kernel's whatever Python called it; otherwise the
innermost Python frame's file decides (a Py_DECREF inside `strip_headers` is the
gateway's headers work). Without --native, py-spy shows no native frames and the socket
calls are charged to the Python frame that made them (`_exchange`, `_writelines`).

py-spy samples wall time while the thread is not idle, so a gateway preempted inside a
socket write (by the backend or Redis it just woke, on the same core) is charged to that
write: the kernel rows read higher than the kernel's share of CPU. bench.cpu's
`gateway_sys_us` (stime) is the measure of that share.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# Innermost native frames that are the kernel's work on the sockets (loopback sends also
# run the receiver's side of TCP in the sender's context).
_SOCKET_WRITE = {"write", "writev", "send", "sendmsg", "__libc_write", "__send"}
_SOCKET_READ = {"read", "readv", "recv", "recvmsg", "__libc_read", "__recv"}
_POLL = {"epoll_wait", "epoll_pwait", "epoll_pwait2"}

# (part, file-path pattern) in order; the first match names the part.
PARTS: list[tuple[str, str]] = [
    ("metrics", r"prometheus_client/|gateway/metrics\.py"),
    ("sessions + Redis", r"gateway/sessions/|gateway/redis/|redis/|hiredis"),
    ("request checks + routing", r"gateway/(checks|paths|routing|forwarded|limits)\.py"),
    ("headers in/out", r"gateway/(outbound|headers|instructions|signing)\.py|multidict"),
    ("plugins", r"gateway/(chain|plugin)\.py|plugins/"),
    ("upstream client", r"gateway/upstream(_client)?\.py|aiohttp/client|aiohttp/streams"),
    ("gateway request flow", r"gateway/(proxy|app|server|responses|logs|body)\.py"),
    ("aiohttp server", r"aiohttp/(web_|http_|_http_|helpers|base_protocol)"),
    ("event loop", r"asyncio/|uvloop|runners\.py"),
]


def _parse_frame(frame: str) -> tuple[str, str]:
    """(function, file) of one collapsed frame, `func (path:line)` or `func (lib)`."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if m is None:
        return frame, ""
    return m.group(1), m.group(2)


def part_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        func, where = _parse_frame(frame)
        if where.endswith(".so.6") or "libc" in where:
            if func in _SOCKET_WRITE:
                return "kernel: socket write"
            if func in _SOCKET_READ:
                return "kernel: socket read"
            if func in _POLL:
                return "event loop"
            continue
        if not where.endswith((".py", ".pyx", ".pxd", ".pxi")) and "<" not in where:
            continue  # a native frame of the interpreter or an extension: look outwards
        for part, pattern in PARTS:
            if re.search(pattern, where):
                return part
        return "other Python"
    return "other native"


def summarize(path: Path) -> tuple[Counter[str], int]:
    parts: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        parts[part_of(stack.split(";"))] += int(n)
        total += int(n)
    return parts, total


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("profiles", nargs="+", type=Path, help="py-spy raw profiles (1 or 2)")
    ap.add_argument("--us", help="CPU µs per request of each run, comma-separated")
    a = ap.parse_args()
    runs = [summarize(p) for p in a.profiles]
    us = [float(x) for x in a.us.split(",")] if a.us else []
    if us and len(us) != len(runs):
        ap.error("--us needs one figure per profile")
    names = [part for part, _ in PARTS] + [
        "kernel: socket write", "kernel: socket read", "other Python", "other native"
    ]  # fmt: skip
    names.sort(key=lambda n: -sum(r[0][n] / max(1, r[1]) for r in runs))
    head = " | ".join(
        f"{p.name} %" + (f" | {p.name} µs/req" if us else "") for p in a.profiles
    )
    print(f"| part | {head} |")
    print("|---|" + "---:|" * (len(runs) * (2 if us else 1)))
    for name in names:
        cells = []
        for i, (parts, total) in enumerate(runs):
            share = parts[name] / max(1, total)
            cells.append(f"{100 * share:.1f}")
            if us:
                cells.append(f"{share * us[i]:.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| samples | " + " | ".join(
        str(t) + (" | " + f"{us[i]:.0f}" if us else "") for i, (_, t) in enumerate(runs)
    ) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
