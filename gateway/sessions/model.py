"""A session: its token, its key id, its fields; and the rules about tokens and fields.

The cookie carries a random token; Redis keys use SHA-256 of it, so neither a Redis dump
nor ``X-Session-Id`` hands out a live cookie (cf. Rack CVE-2019-16782).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from ..redis.keys import public_id

__all__ = [
    "RESERVED_FIELDS",
    "TOKEN_RE",
    "Session",
    "apply_activity",
    "new_token",
    "public_id",
    "ts",
    "valid_token",
]

TOKEN_BYTES = 32  # 256 bits from secrets; the format check below knows its length
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")
# Fields the gateway owns: a backend's X-Session-Set cannot forge them (user_id changes
# only through a login, which also rotates the token).
RESERVED_FIELDS = frozenset(
    {"user_id", "login_time", "last_activity", "current_page", "page_views", "id", "authenticated"}
)


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def valid_token(token: str) -> bool:
    return TOKEN_RE.fullmatch(token) is not None


def ts(t: float) -> str:
    """Epoch seconds as stored in session hashes: with milliseconds."""
    return f"{t:.3f}"


def apply_activity(fields: dict[str, str], last_activity: float, page: str, views: int) -> bool:
    """Apply recorded activity to a copy of a session hash the way the activity script
    applies it in Redis; False when the copy's page_views is not a number. ``page`` is
    empty for activity without a page view (a touch): current_page stays.

    The one operation behind every "copy plus activity not yet in Redis": a cached copy
    as each request is recorded, a hash read from Redis, a copy renewed by a flush."""
    try:
        fields["page_views"] = str(int(fields.get("page_views", "0")) + views)
    except ValueError:
        return False
    fields["last_activity"] = ts(last_activity)
    if page:
        fields["current_page"] = page
    return True


@dataclass(slots=True)
class Session:
    token: str
    key_id: str  # what goes into the Redis key names
    id: str  # X-Session-Id: sha256 of the token, whatever the key layout
    fields: dict[str, str]
    deadline: float  # absolute expiry (epoch seconds)

    @property
    def authenticated(self) -> bool:
        return bool(self.fields.get("user_id"))

    @property
    def user_id(self) -> str | None:
        return self.fields.get("user_id") or None
