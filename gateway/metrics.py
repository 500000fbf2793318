"""Process-wide Prometheus metrics (one registry per process; several apps in one test
process share it, which is why tests compare deltas rather than absolute values).

With ``workers: N`` every worker writes its values to files in PROMETHEUS_MULTIPROC_DIR
(prometheus-client's multiprocess mode, set up by the supervisor: metrics_export.py) and
the admin listener serves their sum; each Gauge says how its workers' values combine
(``multiprocess_mode``). Names are contract once published: add, never rename."""

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
ACTIVITY_PENDING = Gauge(
    "gateway_activity_pending", "Sessions with unflushed activity", multiprocess_mode="livesum"
)
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

# -- issue 13: operations ----------------------------------------------------------------

SESSION_LOOKUPS = Counter(
    "gateway_session_lookups_total",
    "Session cookies looked up, by result: near_cache_hit, redis_hit, miss (no such "
    "session), expired, invalid (a malformed or doubled cookie), error (Redis failed)",
    ["result"],
)
REDIS_SECONDS = Histogram(
    "gateway_redis_seconds",
    "Time of Redis operations on the request and activity paths, failures included",
    ["op"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
REDIS_POOL = Gauge(
    "gateway_redis_pool_connections",
    "Connections of the Redis client pool by state (in_use, idle), sampled",
    ["state"],
    multiprocess_mode="livesum",
)
REDIS_POOL_MAX = Gauge(
    "gateway_redis_pool_max_connections",
    "Connections the Redis client pool may open (redis.max_connections per process)",
    multiprocess_mode="livesum",
)
UPSTREAM_SECONDS = Histogram(
    "gateway_upstream_seconds",
    "Time from sending a request upstream to its response head",
    ["upstream"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
UPSTREAM_UP = Gauge(
    "gateway_upstream_server_up",
    "1 while an upstream server takes connections, 0 while it is ejected (sampled; with "
    "workers, 0 when any worker has it ejected)",
    ["upstream", "server"],
    multiprocess_mode="livemin",
)
UPSTREAM_POOL = Gauge(
    "gateway_upstream_pool_connections",
    "Keep-alive connections to an upstream's servers by state (in_use, idle), sampled",
    ["upstream", "state"],
    multiprocess_mode="livesum",
)
UPSTREAM_POOL_MAX = Gauge(
    "gateway_upstream_pool_max_connections",
    "Pooled connections an upstream's servers may have open (max_connections per server)",
    ["upstream"],
    multiprocess_mode="livesum",
)
REDIS_KEYS = Gauge(
    "gateway_redis_keys",
    "Keys in Redis under session.key_prefix by family (session, cart, user_sessions, ...), "
    "counted by a background SCAN on the admin listener's process",
    ["family"],
    multiprocess_mode="livemax",
)
REDIS_SCAN_SECONDS = Gauge(
    "gateway_redis_keys_scan_seconds",
    "How long the last full count of gateway_redis_keys took",
    multiprocess_mode="livemax",
)
REDIS_MEMORY = Gauge(
    "gateway_redis_memory_bytes",
    "Redis memory (INFO memory): used, and maxmemory (0: no limit), sampled",
    ["kind"],
    multiprocess_mode="livemax",
)
REDIS_EVICTED = Gauge(
    "gateway_redis_evicted_keys",
    "Keys Redis evicted since it started (INFO stats evicted_keys), sampled",
    multiprocess_mode="livemax",
)
CPU_SECONDS = Counter(
    "gateway_cpu_seconds",
    "CPU time (user and system) of the gateway's processes",
)
CPUS = Gauge(
    "gateway_cpus",
    "CPUs the gateway's processes may run on (their affinity mask)",
    multiprocess_mode="livemax",
)
WORKERS = Gauge(
    "gateway_worker_processes",
    "Gateway processes serving requests (workers alive; 1 without workers)",
    multiprocess_mode="livesum",
)
RELOADS = Counter(
    "gateway_config_reloads_total", "Config reloads on SIGHUP, by outcome", ["outcome"]
)
ADMIN_CALLS = Counter(
    "gateway_admin_api_calls_total", "Admin API calls, by action and status", ["action", "status"]
)

# Children that exist from the start, so that every series is there (at 0) before its
# first event: rate() then works from the first scrape, and in multiprocess mode a
# metric without a sample would not be listed at all.
for _result in ("near_cache_hit", "redis_hit", "miss", "expired", "invalid", "error"):
    SESSION_LOOKUPS.labels(_result)
for _event in ("created", "rotated", "logged_out", "revoked"):
    SESSION_EVENTS.labels(_event)
for _outcome in ("ok", "refused"):
    RELOADS.labels(_outcome)
for _state in ("in_use", "idle"):
    REDIS_POOL.labels(_state)
for _kind in ("used", "max"):
    REDIS_MEMORY.labels(_kind)
for _kind in ("connect", "busy", "timeout", "disconnect", "protocol", "body"):
    UPSTREAM_ERRORS.labels(_kind)
for _outcome in ("ok", "error"):
    ACTIVITY_FLUSHES.labels(_outcome)
