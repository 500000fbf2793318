"""Process-wide Prometheus metrics (one registry per process; several apps in one test
process share it, which is why tests compare deltas rather than absolute values)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("gateway_requests_total", "Requests answered", ["route", "status_class"])
UPSTREAM_ERRORS = Counter("gateway_upstream_errors_total", "Upstream failures", ["kind"])
UPSTREAM_EJECTIONS = Counter("gateway_upstream_ejections_total", "Servers ejected", ["server"])
REDIS_COMMANDS = Counter(
    "gateway_redis_commands_total",
    "Commands sent to Redis on the request and activity paths (a script call counts once)",
    ["op"],
)
REDIS_ERRORS = Counter("gateway_redis_errors_total", "Redis calls that failed", ["op"])
INSTRUCTIONS = Counter(
    "gateway_instructions_total", "Backend instruction headers", ["instruction", "outcome"]
)
ACTIVITY_DROPPED = Counter(
    "gateway_activity_dropped_total", "Activity updates dropped on buffer overflow"
)
ACTIVITY_FLUSHES = Counter("gateway_activity_flushes_total", "Activity flushes", ["outcome"])
ACTIVITY_PENDING = Gauge("gateway_activity_pending", "Sessions with unflushed activity")
SESSIONS_CAPPED = Counter(
    "gateway_sessions_capped_total",
    "Sessions a login ended because their user held more than session.max_per_user",
)
PLUGIN_ERRORS = Counter("gateway_plugin_errors_total", "Plugin hooks that raised", ["plugin"])
LATENCY = Histogram(
    "gateway_request_seconds",
    "Time to response headers",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
NEAR_CACHE = Counter(
    "gateway_near_cache_lookups_total", "Session lookups in the near-cache", ["result"]
)
NEAR_CACHE_INVALIDATIONS = Counter(
    "gateway_near_cache_invalidations_total", "Keys invalidated by Redis (tracking pushes)"
)
NEAR_CACHE_REFRESHES = Counter(
    "gateway_near_cache_refreshes_total",
    "Cached sessions renewed from the hash the activity flush brought back",
)
SESSION_EVENTS = Counter(
    "gateway_sessions_total",
    "Sessions created (guests and first logins), rotated (logins replacing a session), "
    "logged out and revoked",
    ["event"],
)
CLIENT_REFUSALS = Counter(
    "gateway_client_refusals_total",
    "Client connections answered and closed by a protocol limit (limits.*)",
    ["reason"],
)
REDIS_WAITS = Counter(
    "gateway_redis_waits_total",
    "WAITs after durable writes (redis.wait): ok, or short of replicas (answered 503)",
    ["outcome"],
)
REDIS_MASTER_CHANGES = Counter(
    "gateway_redis_master_changes_total",
    "Times the Sentinels named another master (redis.sentinel)",
)
