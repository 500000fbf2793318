"""The ``legacy_sessions`` options, validated once at start (and by ``--check``)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from gateway.headers import FIELD_NAME_RE
from gateway.plugin import PluginConfig
from gateway.sessions.model import RESERVED_FIELDS

# Values a statement's parameters may name, besides session fields (rollback login only).
QUERY_PARAMS = frozenset({"token", "now"})
_READ_ONLY = re.compile(r"\s*(select|with)\b", re.IGNORECASE)


class Statement(PluginConfig):
    """One SQL statement with ``$1``-style placeholders (SQLite reads them as ``?1``)
    and what each placeholder is: ``token`` (the legacy cookie's value), ``now`` (epoch
    seconds, a float) or, for the rollback login, a session field (``user_id``, …)."""

    sql: str = Field(min_length=1)
    params: tuple[str, ...] = ("token",)

    @model_validator(mode="after")
    def _placeholders(self) -> Statement:
        used = {int(n) for n in re.findall(r"\$(\d+)", self.sql)}
        if used and max(used) > len(self.params):
            raise ValueError(f"sql uses ${max(used)} but params names {len(self.params)}")
        return self


class LegacyCookie(PluginConfig):
    """The legacy app's own session cookie (``PHPSESSID``, ``JSESSIONID``, …)."""

    name: str = Field(min_length=1, max_length=128)
    # Values of any other shape are never looked up (a flood of junk costs no query).
    pattern: str = r"[A-Za-z0-9_.,-]{16,256}"
    # After an import: keep (the legacy app still knows the visitor: needed to roll back)
    # or expire the cookie on the client.
    on_import: Literal["keep", "expire"] = "keep"
    # For the cookie the gateway writes itself (a rollback login, an expiry).
    path: str = "/"
    domain: str | None = None
    secure: bool = True
    http_only: bool = True
    same_site: Literal["Strict", "Lax", "None"] = "Lax"
    # New legacy tokens (rollback logins): secrets.token_urlsafe(token_bytes).
    token_bytes: int = Field(32, ge=16, le=64)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", v):
            raise ValueError("must be a cookie name (an HTTP token)")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        return v


class Rollback(PluginConfig):
    """Logins and logouts made through the gateway, written to the legacy table too
    (behind, in batches), so that turning the gateway's sessions off logs no one out."""

    # A new legacy session for a login: params from token, now and the session's fields.
    login: Statement
    # A legacy session that ended (a logout, or the one a login replaced): token, now.
    logout: Statement
    flush_interval: float = Field(0.5, gt=0, le=60)
    batch_size: int = Field(200, ge=1, le=10_000)
    max_pending: int = Field(10_000, ge=1, le=1_000_000)
    # A batch the database refused this many times is dropped (and counted); attempts
    # back off from flush_interval, doubling up to max_backoff (the defaults ride out
    # about four minutes of database down).
    max_attempts: int = Field(12, ge=1, le=1000)
    max_backoff: float = Field(30, gt=0, le=3600)

    @model_validator(mode="after")
    def _params(self) -> Rollback:
        for name in self.logout.params:
            if name not in QUERY_PARAMS:
                raise ValueError(f"logout.params: {name!r} is not token or now")
        for name in self.login.params:
            if name not in QUERY_PARAMS and not FIELD_NAME_RE.fullmatch(name):
                raise ValueError(f"login.params: {name!r} is not token, now or a field name")
        return self


class LegacySessionsConfig(PluginConfig):
    # postgresql://… (asyncpg, pooled) or sqlite:PATH (the standard library, in a thread).
    dsn: str
    cookie: LegacyCookie
    # Read-only: one row for a live legacy session, none for a missing or expired one.
    query: Statement
    # Session field → the query's column. user_id makes the session a logged-in one.
    fields: dict[str, str]
    # Rows without a user id (the legacy app's guests) become gateway guests too.
    import_guests: bool = False
    # Visitors (by a hash of the legacy cookie) whose sessions the gateway keeps; the rest
    # pass through untouched. 100: everyone; 0: no one (the gateway's sessions are off).
    rollout_percent: int = Field(100, ge=0, le=100)
    timeout: float = Field(1.0, gt=0, le=30, description="seconds per database call")
    pool_size: int = Field(4, ge=1, le=100)
    # Database reads per second and process, at most: well-formed but unknown cookies are
    # each worth one read, and a flood of them must not become a flood of queries.
    max_reads_per_second: float = Field(50, gt=0, le=100_000)
    negative_ttl: float = Field(60, gt=0, le=86_400, description="a miss is remembered")
    # How long "this legacy session was imported" is remembered (never read again): at
    # least the legacy sessions' own lifetime.
    imported_ttl: int = Field(86_400, gt=0, le=90 * 86_400)
    # Requests of one legacy session in other gateway processes while it is imported get
    # the same fields for this long (each its own gateway session), not a second read.
    share_window: float = Field(5, ge=0, le=300)
    cache_size: int = Field(10_000, ge=1, le=1_000_000)
    # After a database failure, the source is skipped this long (counted as db-down).
    retry_after: float = Field(5, gt=0, le=3600)
    # For `migrate status`: the number of legacy sessions still live in the table.
    active_query: Statement | None = None
    rollback: Rollback | None = None

    @model_validator(mode="after")
    def _cookie_kept_for_rollback(self) -> LegacySessionsConfig:
        if self.rollback is not None and self.cookie.on_import == "expire":
            raise ValueError(
                "cookie.on_import: expire drops the legacy cookie a rollback needs; "
                "keep it while rollback is on"
            )
        return self

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, v: str) -> str:
        if not v.startswith(("postgresql://", "postgres://", "sqlite:")):
            raise ValueError("must be postgresql://… or sqlite:PATH")
        if v.startswith("sqlite:") and not v.removeprefix("sqlite:").lstrip("/"):
            raise ValueError("sqlite: needs a path")
        return v

    @field_validator("query", "active_query")
    @classmethod
    def _read_only(cls, v: Statement | None) -> Statement | None:
        if v is None:
            return v
        if not _READ_ONLY.match(v.sql):
            raise ValueError("must be a SELECT (it runs read-only)")
        for name in v.params:
            if name not in QUERY_PARAMS:
                raise ValueError(f"params: {name!r} is not token or now")
        return v

    @field_validator("fields")
    @classmethod
    def _fields(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("must map at least user_id to a column")
        for name in v:
            if not FIELD_NAME_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a session field name")
            if name in RESERVED_FIELDS and name != "user_id":
                raise ValueError(f"{name!r} is the gateway's own field")
        return v
