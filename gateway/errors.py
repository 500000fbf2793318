"""What counts as "Redis could not answer", in one place for the core and the plugins."""

from __future__ import annotations

from redis.exceptions import RedisError

# A connection refused or reset surfaces as OSError, a slow server as TimeoutError
# (from asyncio.timeout or the socket); everything else redis-py raises is a RedisError.
REDIS_FAILURES = (RedisError, OSError, TimeoutError)


class RedisUnavailable(Exception):
    """Redis did not answer within its timeout."""
