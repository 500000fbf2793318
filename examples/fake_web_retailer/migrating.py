"""The shop during a migration to the Session Gateway (``--mode migrating``).

Behind a gateway that rolls its sessions out to a share of the visitors, the shop meets
two kinds of request. One the gateway vouches for carries ``X-Session-Authenticated``
(the gateway strips every X-Session-* header a client sends, and adds its own): it is
served from the headers, exactly as in gateway mode. One the gateway passed through
carries no X-Session-* header at all: it is served from the legacy table and its
``legacy_sid`` cookie, exactly as in legacy mode. So, like gateway mode, this mode must
only be reachable through the gateway.
"""

from __future__ import annotations

from decimal import Decimal

from aiohttp import web

from .db import Database, UserRecord
from .sessions import GatewaySessions, LegacySessions, SessionStore, ShopSession

_FROM_GATEWAY = "X-Session-Authenticated"


class MigratingSessions(SessionStore):
    mode = "migrating"

    def __init__(self, db: Database, idle_ttl: float = 3600.0) -> None:
        self.gateway = GatewaySessions()
        self.legacy = LegacySessions(db, idle_ttl=idle_ttl)

    def _store(self, request: web.Request) -> SessionStore:
        return self.gateway if _FROM_GATEWAY in request.headers else self.legacy

    async def load(self, request: web.Request) -> ShopSession:
        return await self._store(request).load(request)

    async def finish(self, request: web.Request, response: web.StreamResponse) -> None:
        await self._store(request).finish(request, response)

    async def login(
        self, request: web.Request, response: web.StreamResponse, user: UserRecord
    ) -> None:
        await self._store(request).login(request, response, user)

    async def logout(
        self, request: web.Request, response: web.StreamResponse, everywhere: bool
    ) -> None:
        await self._store(request).logout(request, response, everywhere)

    async def cart_add(
        self,
        request: web.Request,
        response: web.StreamResponse,
        sku: str,
        qty: int,
        unit_price: Decimal,
    ) -> None:
        await self._store(request).cart_add(request, response, sku, qty, unit_price)

    async def cart_remove(
        self, request: web.Request, response: web.StreamResponse, sku: str
    ) -> None:
        await self._store(request).cart_remove(request, response, sku)

    async def cart_clear(self, request: web.Request, response: web.StreamResponse) -> None:
        await self._store(request).cart_clear(request, response)


# The live rows are those the shop itself would accept: idle for less than its idle_ttl.
_LIVE = "last_activity > CAST($2 AS DOUBLE PRECISION) - {idle}"


def legacy_sessions_options(
    dsn: str, *, rollout_percent: int = 100, rollback: bool = True, idle_ttl: float = 3600.0
) -> dict[str, object]:
    """The gateway's ``legacy_sessions`` options for this shop's ``sessions`` table
    (db.py): the same SQL runs on SQLite and PostgreSQL."""
    live = _LIVE.format(idle=int(idle_ttl))
    options: dict[str, object] = {
        "dsn": dsn,
        "cookie": {"name": "legacy_sid", "secure": False},
        "query": {
            "sql": f"SELECT user_id, username, email FROM sessions WHERE token = $1 AND {live}",
            "params": ["token", "now"],
        },
        "fields": {"user_id": "user_id", "username": "username", "email": "email"},
        "active_query": {
            "sql": "SELECT count(*) FROM sessions WHERE user_id IS NOT NULL AND "
            + live.replace("$2", "$1"),
            "params": ["now"],
        },
        "rollout_percent": rollout_percent,
    }
    if rollback:
        options["rollback"] = {
            # The shop's own login writes the same columns (db.session_login).
            "login": {
                "sql": "INSERT INTO sessions (token, user_id, username, email, login_time, "
                "created_at, last_activity) VALUES ($1, $2, $3, $4, $5, $5, $5) "
                "ON CONFLICT (token) DO NOTHING",
                "params": ["token", "user_id", "username", "email", "now"],
            },
            "logout": {"sql": "DELETE FROM sessions WHERE token = $1", "params": ["token"]},
        }
    return options
