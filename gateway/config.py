"""config.yaml → typed, frozen settings, validated once at start.

Nothing on the request path reads raw dicts: everything here is checked and converted
before the first connection is accepted. A bad file raises ConfigError with one line that
names the key path (``routes[2].session: must be one of none, optional, required``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .paths import route_path

__all__ = [
    "ClusterSettings",
    "ConfigError",
    "CookieSettings",
    "RedisSettings",
    "RedisTlsSettings",
    "RouteSettings",
    "SentinelSettings",
    "SessionSettings",
    "Settings",
    "UpstreamSettings",
    "WaitSettings",
    "load_settings",
    "parse_settings",
]

# RFC 3986 path and query characters (no backslash, space or control character).
_LOGIN_URL_RE = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A config problem, already phrased as one line: ``key.path: what is wrong``."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CookieSettings(_Frozen):
    name: str = "sid"
    secure: bool = True
    http_only: bool = True
    same_site: Literal["Strict", "Lax", "None"] = "Lax"
    domain: str | None = None
    path: str = "/"
    # Keep the gateway cookie in the Cookie header sent upstream (off by default: the
    # backend has no business with the token).
    forward: bool = False

    @field_validator("name")
    @classmethod
    def _token_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", v):
            raise ValueError("must be a valid cookie name (RFC 6265 token)")
        return v

    @model_validator(mode="after")
    def _none_needs_secure(self) -> CookieSettings:
        if self.same_site == "None" and not self.secure:
            raise ValueError("same_site None requires secure: true (browsers reject it)")
        return self


class NearCacheSettings(_Frozen):
    """Session hashes kept in each gateway process, invalidated by Redis (nearcache.py)."""

    enabled: bool = True
    max_entries: int = Field(10_000, gt=0)
    # Seconds an entry is trusted without a read: the bound on staleness should an
    # invalidation be missed (see TrackingLink.call_own_write).
    max_age: float = Field(5.0, gt=0)


class SessionSettings(_Frozen):
    cookie: CookieSettings = CookieSettings()
    # Live sessions one user may hold; a login past it ends that user's oldest ones, so
    # user_sessions:<user_id> stays bounded however often someone logs in.
    max_per_user: int = Field(100, ge=1, le=10_000)
    near_cache: NearCacheSettings = NearCacheSettings()
    idle_ttl: int = Field(3600, gt=0)
    absolute_ttl: int = Field(28800, gt=0)
    # Store the hash under session:<raw token> (the case study's layout) instead of
    # session:<sha256(token)>. Only for migrating existing data: a dump leaks live tokens.
    raw_token_keys: bool = False
    key_prefix: str = ""

    @model_validator(mode="after")
    def _ttls(self) -> SessionSettings:
        if self.absolute_ttl < self.idle_ttl:
            raise ValueError("absolute_ttl must be >= idle_ttl")
        return self


def _nodes(v: tuple[str, ...]) -> tuple[str, ...]:
    if not v:
        raise ValueError("must list at least one host:port")
    for n in v:
        host, sep, port = n.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"{n!r} must be host:port")
    return v


class RedisTlsSettings(_Frozen):
    """TLS towards Redis (a ``rediss://`` URL, or every node of redis.sentinel and
    redis.cluster; the Sentinels too)."""

    # PEM file of the CA that signed the servers' certificates (absent: the system's).
    ca: str | None = None
    # Client certificate and its key, for servers that require one (tls-auth-clients).
    cert: str | None = None
    key: str | None = None
    # Off only for a test bench: the server's certificate and name go unchecked.
    verify: bool = True

    @model_validator(mode="after")
    def _pair(self) -> RedisTlsSettings:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        return self


class SentinelSettings(_Frozen):
    """The master of a group watched by Redis Sentinels (redis/sentinel.py)."""

    master: str = Field(min_length=1, description="the group name in `sentinel monitor`")
    nodes: tuple[str, ...]
    # The Redis servers' credentials (requirepass / ACL user).
    username: str | None = None
    password: SecretStr | None = None
    # The Sentinels' own (their requirepass), when they have one.
    sentinel_username: str | None = None
    sentinel_password: SecretStr | None = None
    db: int = Field(0, ge=0)
    # Seconds between two questions to the Sentinels about the master's address, so
    # that connections opened before a failover are closed (see redis/sentinel.py).
    check_interval: float = Field(0.5, gt=0, le=10)

    _check_nodes = field_validator("nodes")(_nodes)


class ClusterSettings(_Frozen):
    """A Redis Cluster (redis/cluster.py): any of its nodes; the rest are discovered."""

    nodes: tuple[str, ...]
    username: str | None = None
    password: SecretStr | None = None

    _check_nodes = field_validator("nodes")(_nodes)


class WaitSettings(_Frozen):
    """Durable logins and logouts: each such write is followed by WAIT (redis/durable.py);
    fewer replicas than ``replicas`` acknowledging within ``timeout`` answers 503."""

    replicas: int = Field(ge=1, le=16)
    timeout: float = Field(0.1, gt=0)


class RedisSettings(_Frozen):
    url: str = "embedded"
    # Instead of url (one topology): a Sentinel-watched master, or a Cluster.
    sentinel: SentinelSettings | None = None
    cluster: ClusterSettings | None = None
    tls: RedisTlsSettings | None = None
    wait: WaitSettings | None = None
    timeout: float = Field(0.5, gt=0, description="seconds for any one Redis call")
    connect_timeout: float = Field(0.5, gt=0)
    max_connections: int = Field(64, gt=0)
    data_dir: str = "var/redis"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v != "embedded" and not re.match(r"^(redis|rediss|unix)://", v):
            raise ValueError('must be "embedded" or a redis://, rediss:// or unix:// URL')
        return v

    @property
    def topology(self) -> Literal["url", "sentinel", "cluster"]:
        if self.sentinel is not None:
            return "sentinel"
        if self.cluster is not None:
            return "cluster"
        return "url"

    def problem(self) -> str | None:
        """A bad combination of keys, as one line naming the key path (checked from
        Settings, so the path is whole)."""
        given = self.model_fields_set
        if self.sentinel is not None and self.cluster is not None:
            return "redis.cluster: cannot be combined with redis.sentinel (one topology)"
        if self.topology != "url" and "url" in given:
            return f"redis.{self.topology}: cannot be combined with redis.url (one topology)"
        if self.tls is not None and self.topology == "url" and not self.url.startswith("rediss://"):
            return "redis.tls: needs a rediss:// url, redis.sentinel or redis.cluster"
        if self.wait is not None and self.wait.timeout >= self.timeout:
            return (
                "redis.wait.timeout: must be below redis.timeout (the WAIT runs within the "
                "call's budget)"
            )
        return None


class ActivitySettings(_Frozen):
    flush_interval: float = Field(0.1, gt=0, le=5)
    max_pending: int = Field(100_000, gt=0, description="sessions buffered at most")
    max_backoff: float = Field(5.0, gt=0)
    # One flush call's budget; a flush that exceeds it is retried under the same batch id.
    flush_timeout: float = Field(2.0, gt=0)
    shutdown_timeout: float = Field(5.0, gt=0)
    # What counts as a page view (sessions/pageviews.py): these methods answered with
    # these statuses ("2xx" or a code), except ignored paths (exact, or a prefix ending
    # in "/") and static files (by extension).
    count_methods: tuple[str, ...] = ("GET", "HEAD")
    count_statuses: tuple[str, ...] = ("2xx", "3xx")
    ignore_paths: tuple[str, ...] = ("/favicon.ico", "/robots.txt", "/apple-touch-icon.png")
    static_extensions: tuple[str, ...] = (
        ".css", ".js", ".mjs", ".map", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".ico",
        ".webp", ".avif", ".woff", ".woff2", ".ttf", ".otf",
    )  # fmt: skip

    @field_validator("count_methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not re.fullmatch(r"[A-Za-z]+", m) for m in v):
            raise ValueError("must list HTTP methods (GET, HEAD, ...)")
        return tuple(m.upper() for m in v)

    @field_validator("count_statuses", mode="before")
    @classmethod
    def _statuses(cls, v: Any) -> tuple[str, ...]:
        # YAML reads 204 as a number and 2xx as a string: both are accepted.
        if not isinstance(v, list | tuple):
            raise ValueError('must list status classes ("2xx") or codes (204)')
        out = tuple(str(s).lower() for s in v)
        if any(not re.fullmatch(r"[1-5](xx|[0-9][0-9])", s) for s in out):
            raise ValueError('must list status classes ("2xx") or codes (204)')
        return out

    @field_validator("ignore_paths")
    @classmethod
    def _ignore_paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not p.startswith("/") for p in v):
            raise ValueError("must list paths starting with /")
        return v

    @field_validator("static_extensions")
    @classmethod
    def _extensions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not re.fullmatch(r"\.[A-Za-z0-9]+", e) for e in v):
            raise ValueError('must list extensions such as ".css"')
        return v


class UpstreamSettings(_Frozen):
    servers: tuple[str, ...]
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(60.0, gt=0)
    eject_seconds: float = Field(10.0, ge=0)
    max_connections: int = Field(256, gt=0)

    @field_validator("servers")
    @classmethod
    def _servers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("must list at least one server")
        for s in v:
            if not re.fullmatch(r"https?://[^/?#\s]+", s.rstrip("/")):
                raise ValueError(f"{s!r} must be http(s)://host:port with no path")
        return tuple(s.rstrip("/") for s in v)


class RouteSettings(_Frozen):
    path: str
    upstream: str
    session: Literal["none", "optional", "required"] = "optional"
    methods: tuple[str, ...] | None = None
    host: str | None = None
    # The backend instructions this route applies: the core's (login, set, logout) or a
    # plugin's (cart); checked against the plugins when they load (chain.py).
    instructions: tuple[str, ...] = ()
    guest: bool = False
    on_redis_error: Literal["open", "closed"] = "open"
    login_url: str | None = None
    websocket: bool = False
    # Narrow the X-Session-<Field> headers the backend receives (None: every field).
    session_fields: tuple[str, ...] | None = None
    # Plugins switched off on this route, by name.
    disable_plugins: tuple[str, ...] = ()

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        # Requests are matched in canonical form (paths.py), so the prefix must be one.
        return route_path(v)

    @field_validator("instructions")
    @classmethod
    def _instructions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name):
                raise ValueError(f"{name!r} is not an instruction name")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if v is None else tuple(m.upper() for m in v)

    @field_validator("login_url")
    @classmethod
    def _login_url(cls, v: str | None) -> str | None:
        # SECURITY: browsers read "\\" as "/" and drop tabs and newlines from URLs, so
        # "/\\evil.com" and "/\t/evil.com" lead off-site like "//evil.com". Only a path of
        # visible URL characters, one leading slash and no backslash is accepted.
        if v is not None and (
            not _LOGIN_URL_RE.fullmatch(v) or v.startswith("//") or v.startswith("/%2")
        ):
            raise ValueError(
                "must be a same-site path: one leading /, no backslash, no spaces or "
                "control characters"
            )
        return v

    @model_validator(mode="after")
    def _guest(self) -> RouteSettings:
        if self.guest and self.session == "none":
            raise ValueError("guest: true needs session optional or required")
        return self


class LimitsSettings(_Frozen):
    """What one client may cost the gateway (hardening, issue 10). Every wait on a
    client has a timeout and every buffer a size; defaults suit a busy shop."""

    # Concurrent client connections per process; past it a new connection is answered
    # 503 and closed (kept below the file-descriptor limit, see server.py).
    max_connections: int = Field(10_000, ge=1)
    # Concurrent client connections from one address (IPv6: its /64) per process; past
    # it a new one is answered 429 and closed. Peers in trusted_proxies are not counted
    # (a load balancer speaks for many clients). 0: no cap.
    connections_per_address: int = Field(256, ge=0)
    # Seconds for a whole request head (request line and headers) once its first byte
    # arrived: a slowloris sending a byte every few seconds is answered 408 and closed.
    header_timeout: float = Field(10.0, gt=0)
    # Bytes of one request head, all lines together (max_request_header_size bounds one
    # line); past it 431 and the connection is closed.
    max_header_bytes: int = Field(65536, ge=1024)
    # Seconds an idle keep-alive connection (or one that never sends) is kept open.
    keepalive_timeout: float = Field(30.0, gt=0)
    # Seconds without a byte of the request body, and for the whole body: 408.
    body_idle_timeout: float = Field(15.0, gt=0)
    body_timeout: float = Field(300.0, gt=0)
    # Largest request body accepted (Content-Length or counted while streaming): 413.
    max_body_bytes: int = Field(1 << 30, ge=0)
    # Bodies up to this size are read whole before an upstream connection is taken, so
    # a pooled connection never waits on a slow client. Larger bodies stream on a
    # connection of their own (upstream_per_address and the timeouts above bound it).
    buffer_body_bytes: int = Field(65536, ge=0, le=16 << 20)
    # Seconds a write to the client may wait for it to read (a stalled reader is cut).
    send_timeout: float = Field(60.0, gt=0)
    # Upstream connections one client address (IPv6: its /64) may hold at once: 429.
    upstream_per_address: int = Field(32, ge=1)
    # Guest sessions one client address (IPv6: its /64) may create per minute, across
    # every gateway sharing the Redis (0: no cap).
    guests_per_address: int = Field(120, ge=0)


class PathSettings(_Frozen):
    """How the request path is normalised (paths.py): the path that picks the route is
    the path the backend receives."""

    merge_slashes: bool = True
    # Match routes without regard to case (backends on IIS, Windows or case-insensitive
    # frameworks). Off: a spelling whose lower-case form would pick another route is
    # refused as ambiguous.
    case_insensitive: bool = False
    # Refuse every encoded slash or backslash, raw backslash, ;parameter and segment
    # ending in a dot or space, not only those that another reading would route
    # elsewhere.
    strict: bool = False
    # Characters of a raw path (the query is not counted); longer is 414. Reading a
    # path every way a backend might costs about 0.6 ms per KiB of a hostile one, so
    # this bounds what one request can cost. IIS's default maxUrl is the same.
    max_length: int = Field(4096, ge=64, le=65536)


class ClientHeaderSettings(_Frozen):
    """Request headers dropped because frameworks trust them as set by a proxy or an
    identity layer (headers.py lists the default families)."""

    # More names to drop; a trailing * drops a family (``X-Acme-*``).
    drop: tuple[str, ...] = ()
    # Default names or families to let through after all (one a trusted edge sets).
    keep: tuple[str, ...] = ()

    @field_validator("drop", "keep")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for n in v:
            if not re.fullmatch(r"[A-Za-z0-9!#$%&'+.^_`|~-]+\*?", n):
                raise ValueError(f"{n!r} is not a header name (a trailing * marks a family)")
        return tuple(n.lower().replace("_", "-") for n in v)


class SigningSettings(_Frozen):
    """Sign the X-Session-* headers sent upstream (signing.py), so a backend reachable
    directly can refuse requests that did not come through the gateway."""

    # SecretStr: the key shows as ********** in any repr, log line or error message.
    key: SecretStr = Field(description="HMAC-SHA256 key; use ${ENV}")
    header: str = "X-Session-Signature"

    @field_validator("key")
    @classmethod
    def _key(cls, v: SecretStr) -> SecretStr:
        if len(v.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return v

    @field_validator("header")
    @classmethod
    def _header(cls, v: str) -> str:
        if not re.fullmatch(r"X-Session-[A-Za-z0-9-]+", v):
            raise ValueError("must be an X-Session-* header name")
        return v


class TlsSettings(_Frozen):
    """HTTPS on the proxy listener (most deployments terminate TLS at the balancer)."""

    cert: str
    key: str
    # An extra listener for TLS; absent, ``listen`` itself speaks TLS.
    listen: str | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        return None if v is None else _host_port(v)


class LoggingSettings(_Frozen):
    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = False


def _host_port(v: str) -> str:
    _, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port")
    return v


def split_host_port(v: str) -> tuple[str, int]:
    host, _, port = v.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class AdminSettings(_Frozen):
    # Health and Prometheus metrics on their own listener, so a route of the proxied
    # application can never shadow them and they need not be exposed publicly.
    listen: str | None = None
    # Bearer token of the admin API (admin_api.py); absent, the API is off. SecretStr:
    # it shows as ********** in any repr, log line or error message. Use ${ENV}.
    token: SecretStr | None = None
    # Seconds between background counts of the keys in Redis by family (sessions,
    # carts, ...) and reads of its memory (population.py); 0: never.
    population_interval: float = Field(30.0, ge=0)

    @field_validator("token", mode="before")
    @classmethod
    def _no_token(cls, v: Any) -> Any:
        # `token: ${ADMIN_TOKEN:-}` with the variable unset: the API is off.
        return None if v == "" else v

    @field_validator("token")
    @classmethod
    def _token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        return None if v is None else _host_port(v)


MAX_WORKERS = 64


def parse_workers(value: Any) -> Any:
    """``workers`` as written (config or --workers): "auto" becomes auto_workers(); any
    other text is refused; numbers are left to the field's bounds."""
    if value == "auto":
        return auto_workers()
    if isinstance(value, str) or isinstance(value, bool):
        raise ValueError(f"must be a number from 1 to {MAX_WORKERS} or 'auto'")
    return value


def auto_workers() -> int:
    """``workers: auto``: the CPUs this process may run on, at most MAX_WORKERS."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without affinity masks
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


class Settings(_Frozen):
    listen: str = "127.0.0.1:8080"
    redis: RedisSettings = RedisSettings()
    session: SessionSettings = SessionSettings()
    activity: ActivitySettings = ActivitySettings()
    upstreams: dict[str, UpstreamSettings]
    routes: tuple[RouteSettings, ...]
    plugins: tuple[dict[str, Any], ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    shutdown_timeout: float = Field(15.0, gt=0)
    # Processes sharing the listen port (SO_REUSEPORT); one event loop each. "auto": one
    # per CPU this process may run on (its affinity mask, so a container's cpuset or a
    # taskset counts), resolved when the config is read.
    workers: int = Field(1, ge=1, le=MAX_WORKERS)
    max_request_header_size: int = Field(16384, gt=0)
    limits: LimitsSettings = LimitsSettings()
    paths: PathSettings = PathSettings()
    client_headers: ClientHeaderSettings = ClientHeaderSettings()
    signing: SigningSettings | None = None
    listen_tls: TlsSettings | None = None
    logging: LoggingSettings = LoggingSettings()
    admin: AdminSettings = AdminSettings()

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return _host_port(v)

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        return parse_workers(v)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for n in v:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError as e:
                raise ValueError(f"{n!r} is not an IP address or network") from e
        return v

    @field_validator("plugins", mode="before")
    @classmethod
    def _plugins(cls, v: Any) -> Any:
        if v is None:
            return ()
        if not isinstance(v, list):
            raise ValueError("must be a list of plugin names or {name: {options}}")
        out: list[dict[str, Any]] = []
        for item in v:
            if isinstance(item, str):
                out.append({item: {}})
            elif isinstance(item, dict) and len(item) == 1:
                ((name, opts),) = item.items()
                if opts is not None and not isinstance(opts, dict):
                    raise ValueError(f"{name}: options must be a mapping")
                out.append({str(name): opts or {}})
            else:
                raise ValueError("each entry must be a name or {name: {options}}")
        return tuple(out)

    @model_validator(mode="after")
    def _cross(self) -> Settings:
        if not self.routes:
            raise ValueError("routes: must list at least one route")
        problem = self.redis.problem()
        if problem is not None:
            raise ValueError(problem)
        wait = self.redis.wait
        if wait is not None and wait.timeout >= self.activity.flush_timeout:
            # Each flush's WAIT runs within the flush's budget: at or past it, every
            # flush would time out and be retried for ever.
            raise ValueError(
                "redis.wait.timeout: must be below activity.flush_timeout (each activity "
                "flush waits for the replicas within it)"
            )
        for i, r in enumerate(self.routes):
            if r.upstream not in self.upstreams:
                known = ", ".join(sorted(self.upstreams)) or "none defined"
                raise ValueError(
                    f"routes[{i}].upstream: unknown upstream {r.upstream!r} (known: {known})"
                )
        return self

    def plugin_entries(self) -> list[tuple[str, dict[str, Any]]]:
        return [next(iter(p.items())) for p in self.plugins]


def _expand_env(node: Any, path: str) -> Any:
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            val = os.environ.get(name)
            if val is None or (val == "" and default is not None):
                if default is None:
                    raise ConfigError(f"{path or '<root>'}: environment variable {name} is not set")
                return default
            return val

        return _ENV_RE.sub(sub, node)
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{path}[{i}]") for i, v in enumerate(node)]
    return node


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("function-") or part in ("tagged-union",):
            continue
        else:
            out += f".{part}" if out else part
    return out or "<root>"


def _first_error(e: ValidationError) -> str:
    err = e.errors(include_url=False)[0]
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    loc = _loc(tuple(err["loc"]))
    # Cross-field errors already name their own path.
    if loc == "<root>" and re.match(r"^[\w\[\].]+: ", msg):
        return msg
    if err["type"] == "literal_error":
        allowed = msg.removeprefix("Input should be ").replace("'", "").replace(" or ", ", ")
        msg = f"must be one of {allowed}"
    elif err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "is required"
    return f"{loc}: {msg}"


def parse_settings(raw: Any) -> Settings:
    if raw is None:
        raise ConfigError("<root>: the file is empty")
    if not isinstance(raw, dict):
        raise ConfigError("<root>: must be a mapping of settings")
    expanded = _expand_env(raw, "")
    try:
        return Settings.model_validate(expanded)
    except ValidationError as e:
        raise ConfigError(_first_error(e)) from None


def load_settings(path: str | Path) -> Settings:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"<root>: not valid YAML{where}") from None
    return parse_settings(raw)
