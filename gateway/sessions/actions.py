"""What can be done to sessions, with or without a request: create a guest, log in, set
fields, log out (here or everywhere), revoke. The proxy applies a backend's instructions
through these; an admin API calls the same ones. Each action does everything a change
of a session entails, in one place: the write in Redis, the near-cache and the buffered
activity of the sessions it ended, and the plugins' lifecycle hooks.

Every Redis step is bounded by ``redis.timeout`` and fails as RedisUnavailable.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .. import metrics
from ..config import Settings
from ..errors import bounded
from ..redis import Keys
from .activity import ActivityWriter
from .model import RESERVED_FIELDS, Session
from .store import SessionStore

if TYPE_CHECKING:
    from ..chain import Chain

log = logging.getLogger("gateway.proxy")


class SessionActions:
    def __init__(
        self, settings: Settings, store: SessionStore, activity: ActivityWriter, chain: Chain
    ) -> None:
        self.store = store
        self.activity = activity
        self.chain = chain
        self.keys: Keys = store.keys
        self.timeout = settings.redis.timeout
        self.guests_per_address = settings.limits.guests_per_address

    async def create_guest(self, bucket: str) -> Session | None:
        """A new anonymous session; None when this client address (``bucket``) has
        created ``limits.guests_per_address`` this minute (counted in Redis, so every
        gateway shares the budget)."""
        cap = self.guests_per_address
        if cap:
            count = await bounded("guest", self.store.count_guest(bucket), self.timeout)
            if count > cap:
                return None
        guest = self.store.new_guest()
        await bounded("guest", self.store.create(guest), self.timeout)
        await self.chain.session_created(guest)
        metrics.SESSION_EVENTS.labels("created").inc()
        return guest

    async def adopt(self, fields: dict[str, str]) -> Session:
        """A gateway session for fields a session source found elsewhere (a legacy
        session table): a new token, stored like a login when ``user_id`` is there, like
        a guest's otherwise. The fields the gateway owns are its own."""
        if fields.get("user_id"):
            clean = {k: v for k, v in fields.items() if k not in RESERVED_FIELDS or k == "user_id"}
            new, ended = await bounded("adopt", self.store.login(None, clean), None)
            await self._ended(ended)
        else:
            new = self.store.new_guest()
            new.fields.update({k: v for k, v in fields.items() if k not in RESERVED_FIELDS})
            await bounded("adopt", self.store.create(new), self.timeout)
        await self.chain.session_created(new)
        metrics.SESSION_EVENTS.labels("created").inc()
        return new

    async def login(self, old: Session | None, fields: dict[str, str]) -> Session:
        """A new session (a new token, always) for ``fields``, which must hold a
        ``user_id``; ``old`` is ended in the same transaction. Fields the gateway owns
        are taken from it, not from ``fields``."""
        fields = {k: v for k, v in fields.items() if k not in RESERVED_FIELDS or k == "user_id"}
        if old is not None:
            self.activity.discard(self.keys.session(old.key_id))
        # The store bounds the login and its index upkeep itself.
        new, ended = await bounded("login", self.store.login(old, fields), None)
        # The session exists now; a plugin that cannot move its state is logged rather
        # than turning a completed login into an error.
        await self.chain.session_rotated(old, new)
        await self._ended(ended)
        metrics.SESSION_EVENTS.labels("rotated" if old is not None else "created").inc()
        log.info("login user_id=%r session=%s", new.user_id, new.id[:12])
        return new

    async def set(self, session: Session, fields: dict[str, str]) -> bool:
        """Update fields of a live session; False when none may be set (the gateway's
        own are refused)."""
        clean = {k: v for k, v in fields.items() if k not in RESERVED_FIELDS}
        if not clean:
            return False
        await bounded("set", self.store.update(session, clean), self.timeout)
        return True

    async def logout(self, session: Session, everywhere: bool = False) -> None:
        """End this session, or (``everywhere``) every session of its user, in bounded
        steps: each step's sessions are cleaned up before the next begins. A failure
        part-way raises RedisUnavailable; what it left, the next logout everywhere ends."""
        self.activity.discard(self.keys.session(session.key_id))
        steps = self.store.logout(session, everywhere)
        ended = 0
        try:
            while (ids := await bounded("logout", anext(steps, None), self.timeout)) is not None:
                await self._ended(ids)
                ended += len(ids)
        finally:
            await steps.aclose()
            # Sessions, as the other events count: a logout everywhere ends several.
            metrics.SESSION_EVENTS.labels("logged_out").inc(ended)
        log.info("logout%s session=%s", " everywhere" if everywhere else "", session.id[:12])

    async def revoke(self, key_id: str) -> bool:
        """End one session by its key id (no request, no token); False when it was gone
        already."""
        gone = await bounded("revoke", self.store.delete(key_id), self.timeout)
        if gone:
            self.activity.discard(self.keys.session(key_id))
            await self._ended([key_id])
            metrics.SESSION_EVENTS.labels("revoked").inc()
        return gone

    async def revoke_user(self, user_id: str) -> int:
        """End every session of a user, in bounded steps; how many were ended."""
        steps = self.store.users.end_all(user_id)
        n = 0
        try:
            while (ids := await bounded("revoke", anext(steps, None), self.timeout)) is not None:
                self.store.forget(*ids)
                await self._ended(ids)
                n += len(ids)
        finally:
            await steps.aclose()
        metrics.SESSION_EVENTS.labels("revoked").inc(n)
        return n

    async def _ended(self, key_ids: list[str]) -> None:
        """These sessions are gone from Redis: their buffered activity and what the
        plugins keep for them go too."""
        for k in key_ids:
            self.activity.discard(self.keys.session(k))
        await self.chain.sessions_deleted(key_ids)
