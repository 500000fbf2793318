"""Backend instruction headers: which ones a route accepts, and how the core's own are
parsed (X-Session-Login, -Set, -Logout). Plugins declare theirs (``Plugin.instructions``)
and parse them themselves. Everything refused is logged and counted."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from multidict import CIMultiDictProxy

from . import metrics
from .errors import RedisUnavailable
from .forwarded import bucket
from .headers import SESSION_PREFIX, normalized, parse_params

if TYPE_CHECKING:
    from .chain import Chain
    from .plugin import RequestContext
    from .sessions.actions import SessionActions
    from .sessions.cookies import SessionCookie

log = logging.getLogger("gateway.instructions")

# `instructions:` entry → the headers (normalized) it allows. The core's own; plugins add
# theirs (chain.Chain.instruction_owners).
CORE_INSTRUCTIONS: Mapping[str, tuple[str, ...]] = {
    "login": ("x-session-login",),
    "set": ("x-session-set",),
    "logout": ("x-session-logout",),
}


class Table:
    """Instruction header → the ``instructions:`` entry that allows it, and whether a
    plugin (not the core) consumes it."""

    def __init__(self, plugin_entries: Mapping[str, tuple[str, ...]] = {}) -> None:
        self.entry: dict[str, str] = {}
        self.owned_by_plugin: set[str] = set()
        for entry, headers in CORE_INSTRUCTIONS.items():
            for h in headers:
                self.entry[h] = entry
        for entry, headers in plugin_entries.items():
            for h in headers:
                self.entry[normalized(h)] = entry
                self.owned_by_plugin.add(normalized(h))


def collect(
    headers: CIMultiDictProxy[str], allowed: tuple[str, ...], table: Table
) -> dict[str, str]:
    """The instruction headers of a backend response that this route allows, keyed by
    normalized name, with their values. Unknown, disallowed and duplicated ones are
    dropped here: a header given twice is refused rather than guessed at."""
    found: dict[str, list[str]] = {}
    for name, value in headers.items():
        norm = normalized(name)
        if norm.startswith(SESSION_PREFIX):
            found.setdefault(norm, []).append(value)
    out: dict[str, str] = {}
    for name, values in found.items():
        entry = table.entry.get(name)
        label = name.removeprefix("x-session-")
        if entry is None:
            dropped(label, "unknown")
        elif entry not in allowed:
            dropped(label, "not-allowed")
        elif len(values) != 1:
            dropped(label, "duplicated")
        else:
            out[name] = values[0]
    return out


def parse_core(name: str, value: str) -> dict[str, str] | None:
    """One of the core's instructions parsed; None (and counted) when malformed."""
    value = value.strip()
    if name == "x-session-logout":
        v = value.lower()
        parsed: dict[str, str] | None = {v: "1"} if v in ("this", "all") else None
    else:
        parsed = parse_params(value)
    if parsed is None:
        dropped(name.removeprefix("x-session-"), "malformed")
    return parsed


def dropped(instruction: str, why: str) -> None:
    metrics.INSTRUCTIONS.labels(instruction, why).inc()
    log.warning("instruction X-Session-%s dropped: %s", instruction.title(), why)


class Applier:
    """Applies a backend's instructions for one response, through the session actions;
    the cookies they decide go on ``ctx.cookies``. Raises RedisUnavailable when Redis
    cannot store one (the client then gets 503, never a login that did not happen)."""

    def __init__(self, actions: SessionActions, chain: Chain, cookie: SessionCookie) -> None:
        self.actions = actions
        self.chain = chain
        self.cookie = cookie
        self.table = Table(
            {e: hs for p in chain.plugins for e, hs in type(p).instructions.items()}
        )

    async def apply(self, ctx: RequestContext, headers: CIMultiDictProxy[str]) -> None:
        values = collect(headers, ctx.route.instructions, self.table)
        if not values:
            return
        mine = {h: v for h, v in values.items() if h in self.table.owned_by_plugin}
        needs_session = bool(mine) or "x-session-set" in values
        if (
            needs_session
            and ctx.session is None
            and ctx.route.guest
            and ctx.redis_ok
            and "x-session-login" not in values
            and "x-session-logout" not in values
        ):
            await self._guest(ctx)
        if "x-session-logout" in values:
            params = parse_core("x-session-logout", values["x-session-logout"])
            if params is not None:
                await self._logout(ctx, "all" in params)
        if "x-session-login" in values:
            params = parse_core("x-session-login", values["x-session-login"])
            if params is not None:
                await self._login(ctx, params)
        if "x-session-set" in values:
            params = parse_core("x-session-set", values["x-session-set"])
            if params is not None:
                await self._set(ctx, params)
        if mine:
            if ctx.session is None:
                for h in mine:
                    dropped(h.removeprefix("x-session-"), "no-session")
                return
            for h in mine:
                metrics.INSTRUCTIONS.labels(self.table.entry[h], "handed-to-plugin").inc()
            await self.chain.instruction(ctx, mine)

    async def _guest(self, ctx: RequestContext) -> None:
        """A guest session for a visitor whose backend just stored something for it.

        Guests are created only when something needs one: a visitor without a session
        is anonymous until the backend sends X-Session-Set or a plugin's instruction (a
        cart change). A 404, a bot, a health probe creates nothing. At most
        limits.guests_per_address per minute per client address (IPv6: its /64); past
        it the instructions are dropped and counted."""
        guest = await self.actions.create_guest(bucket(ctx.client_address))
        if guest is None:
            dropped("guest", "address-cap")
            return
        ctx.session = guest
        ctx.cookies.append(self.cookie.for_token(guest.token))
        metrics.INSTRUCTIONS.labels("guest", "created").inc()

    async def _login(self, ctx: RequestContext, fields: dict[str, str]) -> None:
        if not fields.get("user_id"):
            dropped("login", "malformed")
            return
        old = ctx.session
        new = await self.actions.login(old, fields)
        ctx.rotated_from = old
        ctx.logged_in = True
        ctx.session = new
        self.cookie.replace(ctx.cookies, self.cookie.for_token(new.token))
        metrics.INSTRUCTIONS.labels("login", "applied").inc()

    async def _set(self, ctx: RequestContext, fields: dict[str, str]) -> None:
        s = ctx.session
        if s is None:
            dropped("set", "no-session")
            return
        if not await self.actions.set(s, fields):
            dropped("set", "reserved")
            return
        metrics.INSTRUCTIONS.labels("set", "applied").inc()

    async def _logout(self, ctx: RequestContext, everywhere: bool) -> None:
        s = ctx.session
        # The cookie expires whatever happens next: a failure part-way still answers
        # with it (503), and leaves the rest to the next logout everywhere.
        self.cookie.replace(ctx.cookies, self.cookie.expired)
        ctx.session = None
        if s is not None:
            await self.actions.logout(s, everywhere)
        elif not ctx.redis_ok:
            # Redis failed while resolving this request's session: the backend saw it as
            # anonymous, but the session its cookie names may be alive. Acknowledging the
            # logout would leave it so, behind the client's back (measured by `make
            # failover-demo`: 15 of 174 logouts during a failover). 503 tells the client
            # to retry; the cookie is expired either way.
            raise RedisUnavailable("logout")
        metrics.INSTRUCTIONS.labels("logout", "applied").inc()
