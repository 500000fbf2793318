"""Rate limiting per session or per client address, shared by every gateway process.

Algorithm: a sliding-window *log* — a ZSET per client holding the time of each request
it was allowed in the last ``window`` seconds, trimmed and counted by one Lua script.
Chosen over the two-fixed-windows counter because it is exact: no burst of up to 2x the
limit across a window boundary, and ``RateLimit-Remaining``/``Retry-After`` are true
values rather than estimates. Its cost is memory proportional to ``limit`` per active
client (only allowed requests are stored, so never more than ``limit`` entries), which is
why ``limit`` is capped; for limits in the tens of thousands a counter would be better.
The script takes the time from Redis (``TIME``), so gateways with skewed clocks agree.

When Redis does not answer within ``redis.timeout``, ``on_redis_error`` decides: ``allow``
(default; the limiter must not take the shop down with it) or ``deny`` (answer 503).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
from dataclasses import dataclass
from typing import Literal, cast

from aiohttp import web
from prometheus_client import Counter
from pydantic import Field

from gateway.errors import REDIS_FAILURES
from gateway.forwarded import bucket
from gateway.plugin import Plugin, PluginConfig, RequestContext, ResponseHead
from gateway.responses import unavailable

log = logging.getLogger("plugins.rate_limit")

RATE_LIMITED = Counter(
    "gateway_rate_limit_total", "Rate limit decisions", ["outcome"]
)  # outcome: allowed, limited, redis-error-allowed, redis-error-denied

# KEYS[1] = the client's log; ARGV = limit, window (ms), unique member suffix
# Returns {allowed (0/1), remaining, milliseconds until the oldest entry leaves}.
# Milliseconds, not microseconds: Lua turns numbers into strings with 14 significant
# digits, and a microsecond timestamp has 16.
_SLIDING_LOG = """
local limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
local allowed = 0
if count < limit then
  redis.call('ZADD', KEYS[1], now, now .. ':' .. ARGV[3])
  count = count + 1
  allowed = 1
end
redis.call('PEXPIRE', KEYS[1], window)
local reset = window
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if oldest[2] then reset = tonumber(oldest[2]) + window - now end
return {allowed, limit - count, reset}
"""


class RateLimitConfig(PluginConfig):
    per: Literal["session", "address"] = "session"
    limit: int = Field(100, ge=1, le=100_000)
    window: float = Field(60, gt=0, le=86400, description="seconds")
    on_redis_error: Literal["allow", "deny"] = "allow"


@dataclass(slots=True)
class Decision:
    allowed: bool
    remaining: int
    reset: int  # seconds until one more request would be allowed


class RateLimit(Plugin):
    name = "rate_limit"
    Config = RateLimitConfig
    fault_policy = "open"

    config: RateLimitConfig

    async def startup(self) -> None:
        self._script = self.services.script(_SLIDING_LOG)
        self._policy = f"{self.config.limit};w={_seconds(self.config.window)}"
        # Log members must be unique per request: not the X-Request-Id, which a client
        # may choose (repeating it would collapse entries and undercount).
        self._nonce = secrets.token_hex(4)
        self._seq = itertools.count()

    def client_key(self, ctx: RequestContext) -> str:
        s = ctx.session
        # Only a logged-in session is a client identity: guest cookies cost nothing to
        # collect, and a client holding many would multiply its limit. Guests are
        # limited by address.
        if self.config.per == "session" and s is not None and s.authenticated:
            return self.services.keys.named(f"ratelimit:s:{s.id}")
        # The core's answer to "who is the client" (trusted proxies applied); an IPv6
        # client is counted by its /64, which it typically owns whole.
        return self.services.keys.named(f"ratelimit:a:{bucket(ctx.client_address)}")

    async def request(self, ctx: RequestContext) -> web.StreamResponse | None:
        cfg = self.config
        member = f"{self._nonce}{next(self._seq)}"
        try:
            if not ctx.redis_ok:
                raise ConnectionError("redis failed earlier in this request")
            async with asyncio.timeout(self.services.redis_timeout):
                res = cast(
                    list[int],
                    await self._script(
                        keys=[self.client_key(ctx)],
                        args=[cfg.limit, math.ceil(cfg.window * 1000), member],
                    ),
                )
        except REDIS_FAILURES as e:
            if cfg.on_redis_error == "allow":
                RATE_LIMITED.labels("redis-error-allowed").inc()
                log.warning("rate limit skipped, redis failed: %s: %s", type(e).__name__, e)
                return None
            RATE_LIMITED.labels("redis-error-denied").inc()
            log.warning("rate limit denied, redis failed: %s: %s", type(e).__name__, e)
            return unavailable("rate limiter unavailable")
        d = Decision(bool(res[0]), max(0, int(res[1])), max(1, math.ceil(int(res[2]) / 1000)))
        ctx.state["rate_limit"] = d
        if d.allowed:
            RATE_LIMITED.labels("allowed").inc()
            return None
        RATE_LIMITED.labels("limited").inc()
        return web.Response(
            status=429, text="too many requests\n", headers={"Retry-After": str(d.reset)}
        )

    async def response(self, ctx: RequestContext, head: ResponseHead) -> None:
        d = ctx.state.get("rate_limit")
        if not isinstance(d, Decision):
            return
        head.headers["RateLimit-Limit"] = str(self.config.limit)
        head.headers["RateLimit-Remaining"] = str(d.remaining)
        head.headers["RateLimit-Reset"] = str(d.reset)
        head.headers["RateLimit-Policy"] = self._policy


def _seconds(v: float) -> str:
    return str(int(v)) if v == int(v) else str(v)
