"""Backend instruction headers: which ones a route accepts, and how the core's own are
parsed (X-Session-Login, -Set, -Logout). Plugins declare theirs (``Plugin.instructions``)
and parse them themselves. Everything refused is logged and counted."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from multidict import CIMultiDictProxy

from . import metrics
from .errors import RedisUnavailable
from .forwarded import bucket
from .headers import normalized, parse_params, session_header_name

if TYPE_CHECKING:
    from .chain import Chain
    from .plugin import Plugin, RequestContext
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
    """Instruction header → the ``instructions:`` entry that allows it and the plugin
    that consumes it (None: the core). Built once from the chain: the one table both
    the collecting and the handing over read. ``known`` adds the entries of plugins that
    are not enabled (a route may name one: its headers are dropped as having no
    plugin)."""

    def __init__(
        self,
        plugins: Iterable[Plugin] = (),
        known: Mapping[str, tuple[str, ...]] = {},
    ) -> None:
        self.entry: dict[str, str] = {}
        self.owner: dict[str, Plugin] = {}
        for entry, headers in CORE_INSTRUCTIONS.items():
            for h in headers:
                self.entry[h] = entry
        for p in plugins:
            for entry, headers in type(p).instructions.items():
                for h in headers:
                    # No header is claimed twice: validate_plugins refused that.
                    norm = normalized(h)
                    self.entry[norm] = entry
                    self.owner[norm] = p
        self.without_plugin: dict[str, str] = {
            normalized(h): entry
            for entry, headers in known.items()
            for h in headers
            if normalized(h) not in self.entry
        }


def collect(
    headers: CIMultiDictProxy[str], allowed: tuple[str, ...], table: Table
) -> dict[str, str]:
    """The instruction headers of a backend response that this route allows, keyed by
    normalized name, with their values. Unknown, disallowed and duplicated ones are
    dropped here: a header given twice is refused rather than guessed at."""
    found: dict[str, list[str]] = {}
    for name, value in headers.items():
        norm = session_header_name(name)
        if norm is not None:
            found.setdefault(norm, []).append(value)
    out: dict[str, str] = {}
    for name, values in found.items():
        entry = table.entry.get(name)
        if entry is None and name in table.without_plugin:
            dropped(table.without_plugin[name], f"no-{table.without_plugin[name]}-plugin")
        elif entry is None:
            dropped(name.removeprefix("x-session-"), "unknown")
        elif entry not in allowed:
            dropped(name.removeprefix("x-session-"), "not-allowed")
        elif len(values) != 1:
            dropped(name.removeprefix("x-session-"), "duplicated")
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


class TooManyGuests(Exception):
    """This client address created limits.guests_per_address guests this minute."""


class Applier:
    """Applies a backend's instructions for one response, through the session actions;
    the cookies they decide go on ``ctx.cookies``. Raises RedisUnavailable when Redis
    cannot store one (the client then gets 503, never a login that did not happen), and
    TooManyGuests past the per-address guest cap (429)."""

    def __init__(
        self, actions: SessionActions, chain: Chain, cookie: SessionCookie, table: Table
    ) -> None:
        self.actions = actions
        self.chain = chain
        self.cookie = cookie
        self.table = table

    def collect(self, ctx: RequestContext, headers: CIMultiDictProxy[str]) -> dict[str, str]:
        """The instructions of this response the route allows (``apply`` them)."""
        return collect(headers, ctx.route.instructions, self.table)

    async def apply(self, ctx: RequestContext, values: dict[str, str]) -> None:
        """Carry out ``values`` (from ``collect``, not empty)."""
        if ctx.sessions_bypassed:
            # The backend keeps this visitor's session itself: a login here would start
            # a gateway session the rollout did not choose.
            for h in values:
                dropped(h.removeprefix("x-session-"), "sessions-bypassed")
            return
        route_plugins = self.chain.route(ctx.route).plugins
        mine: dict[str, str] = {}
        for h, v in values.items():
            owner = self.table.owner.get(h)
            if owner is None:
                continue
            if owner in route_plugins:
                mine[h] = v
            else:
                entry = self.table.entry[h]
                dropped(entry, f"no-{entry}-plugin")  # switched off on this route
        logout = _parsed(values, "x-session-logout")
        login = _parsed(values, "x-session-login")
        fields = _parsed(values, "x-session-set")
        if (
            (mine or fields)
            and ctx.session is None
            and ctx.route.guest
            and ctx.redis_ok
            and login is None
            and logout is None
        ):
            await self._guest(ctx)
        if logout is not None:
            await self._logout(ctx, "all" in logout)
        if login is not None:
            await self._login(ctx, login)
        if fields is not None:
            await self._set(ctx, fields)
        if mine:
            if ctx.session is None:
                for h in mine:
                    dropped(self.table.entry[h], "no-session")
                return
            for h in mine:
                metrics.INSTRUCTIONS.labels(self.table.entry[h], "handed-to-plugin").inc()
            await self.chain.instruction(ctx, mine)

    async def _guest(self, ctx: RequestContext) -> None:
        """A guest session for a visitor whose backend just stored something for it.

        Guests are created only when something needs one: a visitor without a session
        is anonymous until the backend sends X-Session-Set or a plugin's instruction (a
        cart change). A 404, a bot, a health probe creates nothing. At most
        limits.guests_per_address per minute per client address (IPv6: its /64): past
        it TooManyGuests. Redis failing here follows the route's on_redis_error: open
        answers without the instructions that needed the session."""
        try:
            guest = await self.actions.create_guest(bucket(ctx.client_address))
        except RedisUnavailable:
            ctx.redis_ok = False
            if ctx.route.on_redis_error == "closed":
                raise
            dropped("guest", "redis-error")
            return
        if guest is None:
            dropped("guest", "address-cap")
            raise TooManyGuests(ctx.client_address)
        ctx.session = guest
        # Replaces an expiry decided for a stale cookie: one Set-Cookie per name.
        self.cookie.replace(ctx.cookies, self.cookie.for_token(guest.token))
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


def _parsed(values: dict[str, str], name: str) -> dict[str, str] | None:
    return parse_core(name, values[name]) if name in values else None
