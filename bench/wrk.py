"""wrk runs: a Lua script that rotates session cookies and reports one parseable line.

The script reads one `Cookie` header value per line from a file the harness writes
(every thread starts at its own offset so threads don't hit the same sessions in step).
With `rate > 0` it also defines `delay()`, which throttles wrk to a constant request
rate by handing out send slots from a per-thread schedule: wrk has no rate option and
wrk2 is not packaged for this distribution, so this is the "Lua-throttled wrk" approach.
wrk measures latency from the moment a request is written, so when the schedule falls
behind (`late` > 0) the run was at max rate and latency is from send, not from schedule.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from bench.procs import HarnessError, Pinning

LUA_COMMON = r"""
local threads = {}
local nthreads = 0

function setup(thread)
  nthreads = nthreads + 1
  thread:set("tid", nthreads)
  table.insert(threads, thread)
end

function init(args)
  local file, method, path = args[1], args[2], args[3]
  reqs = {}
  local f = io.open(file, "r")
  if f then
    for line in f:lines() do
      if line ~= "" then
        table.insert(reqs, wrk.format(method, path, { ["Cookie"] = line }))
      end
    end
    f:close()
  end
  if #reqs == 0 then reqs = { wrk.format(method, path) } end
  -- Spread threads over the cookie list; a prime stride keeps them apart.
  idx = ((tid or 1) - 1) * 7919 % #reqs
  rate_per_thread = tonumber(args[4]) or 0
  late = 0
  max_lag_ms = 0
end

function request()
  -- wrk calls request() once in its main Lua state (before init) to validate it.
  if reqs == nil then return wrk.format() end
  idx = idx % #reqs + 1
  return reqs[idx]
end

function done(summary, latency, requests)
  local e = summary.errors
  local late_total, lag = 0, 0
  for _, t in ipairs(threads) do
    late_total = late_total + (t:get("late") or 0)
    lag = math.max(lag, t:get("max_lag_ms") or 0)
  end
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,' ..
    '"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,"mean_us":%.1f,' ..
    '"max_us":%d,"p50_us":%d,"p90_us":%d,"p95_us":%d,"p99_us":%d,"p999_us":%d,' ..
    '"late":%d,"max_lag_ms":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency.mean, latency.max, latency:percentile(50),
    latency:percentile(90), latency:percentile(95), latency:percentile(99),
    latency:percentile(99.9), late_total, lag))
end
"""

LUA_THROTTLE = r"""
local ffi = require("ffi")
pcall(ffi.cdef, [[
  struct bench_timeval { long tv_sec; long tv_usec; };
  int gettimeofday(struct bench_timeval *tv, void *tz);
]])
local tv = ffi.new("struct bench_timeval")
local function now_ms()
  ffi.C.gettimeofday(tv, nil)
  return tonumber(tv.tv_sec) * 1000 + tonumber(tv.tv_usec) / 1000
end
local next_slot = nil

-- Called by wrk after each response; returns how many ms to wait before the next send
-- on that connection. Slots are consumed in order, so the long-run rate is the target
-- rate whatever the rounding to whole milliseconds.
function delay()
  local now = now_ms()
  if next_slot == nil then next_slot = now end
  local slot = next_slot
  next_slot = next_slot + 1000 / rate_per_thread
  local d = slot - now
  if d < 0 then
    if -d > 1 then late = late + 1 end
    if -d > max_lag_ms then max_lag_ms = -d end
    return 0
  end
  return math.floor(d)
end
"""


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    errors: int
    socket_errors: int
    status_errors: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    late: int
    max_lag_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def error_rate(self) -> float:
        attempts = self.requests + self.socket_errors
        return self.errors / attempts if attempts else 1.0

    def as_dict(self) -> dict[str, float | int]:
        d: dict[str, float | int] = dict(self.__dict__)
        d["rps"] = round(self.rps, 1)
        d["error_rate"] = self.error_rate
        return d


def write_script(tmp: Path, throttled: bool) -> Path:
    path = tmp / ("rotate_throttled.lua" if throttled else "rotate.lua")
    path.write_text((LUA_THROTTLE if throttled else "") + LUA_COMMON)
    return path


async def run_wrk(
    url: str,
    path: str,
    cookie_file: Path,
    tmp: Path,
    pin: Pinning,
    duration: float,
    connections: int,
    method: str = "GET",
    rate: int = 0,
) -> WrkResult:
    """One wrk run; `rate` > 0 throttles to that many requests/s in total."""
    threads = pin.load_threads()
    connections = max(connections, threads)
    script = write_script(tmp, rate > 0)
    cmd = pin.wrap(
        [
            "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
            "--timeout", "5s", "-s", str(script), url + path, "--",
            str(cookie_file), method, path, str(rate / threads if rate else 0),
        ],
        pin.load_cpus,
    )  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), duration + 30)
    except TimeoutError:
        proc.kill()
        raise HarnessError(f"wrk against {url} did not finish") from None
    text = out.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("BENCH_RESULT "):
            d = json.loads(line.split(" ", 1)[1])
            break
    else:
        raise HarnessError(f"wrk printed no result (rc={proc.returncode}): {text}{err.decode()}")
    sock = d["err_connect"] + d["err_read"] + d["err_write"] + d["err_timeout"]
    return WrkResult(
        requests=d["requests"],
        duration_s=d["duration_us"] / 1e6,
        errors=sock + d["err_status"],
        socket_errors=sock,
        status_errors=d["err_status"],
        mean_ms=d["mean_us"] / 1000,
        p50_ms=d["p50_us"] / 1000,
        p90_ms=d["p90_us"] / 1000,
        p95_ms=d["p95_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        p999_ms=d["p999_us"] / 1000,
        max_ms=d["max_us"] / 1000,
        late=d["late"],
        max_lag_ms=d["max_lag_ms"],
    )
