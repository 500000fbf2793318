"""The per-user index ``user_sessions:<user_id>``: kept to live sessions, capped, and
ended in bounded steps.

The index is a SET of one user's session key ids (its name and type are contract). A
session that expires leaves its id behind, so each login does some upkeep on the set
(``trim``): it checks a bounded sample of members, drops the dead ones and, beyond
``session.max_per_user`` live sessions, ends the oldest. "Logout everywhere"
(``end_all``) moves the set aside in O(1) and ends its members a batch at a time: no
single command holds Redis for longer than one batch, however large the set has grown
(one Lua script over 136k members blocked Redis for 641 ms).

Neither needs a transaction around its reads and writes: an id whose hash is gone never
comes back (tokens are random, and neither the activity flush nor X-Session-Set
recreates a missing hash), so an id found dead stays dead, and ending a session twice
is harmless.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, cast

from .. import metrics
from ..config import SessionSettings
from ..redis.durable import Command, Spread, Writes
from ..redis.scripts import Script

if TYPE_CHECKING:
    from ..redis import Keys, RedisClient

SAMPLE = 200  # members a login checks at most (2 x max_per_user when that is more)
BATCH = 100  # sessions a logout-everywhere step ends
_READS = metrics.REDIS_COMMANDS.labels("session_read")
_WRITES = metrics.REDIS_COMMANDS.labels("session_write")

# KEYS[1] = user set, KEYS[2] = its being-ended set (one slot under hash tags);
# ARGV[1] = absolute_ttl. Returns 1 moved, 0 an ending set is there already (a logout
# everywhere cut short, or one running now), -1 no user set. O(1): RENAMENX never
# deletes a destination, and the set's members are not read.
_MOVE = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('RENAMENX', KEYS[1], KEYS[2]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
""",
    op="session_write",
)


class UserSessions:
    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        settings: SessionSettings,
        writes: Writes | None = None,
    ) -> None:
        self.redis = redis
        self.writes = writes or Writes(redis)
        self.keys = keys
        self.max_per_user = settings.max_per_user
        self.absolute_ttl = settings.absolute_ttl
        # After a login whose sample covered the set, it holds no dead id and at most
        # max_per_user live ones (one more after racing logins), so twice that keeps
        # covering it unless a failed upkeep leaves more behind.
        self.sample = max(SAMPLE, 2 * settings.max_per_user)

    def sample_command(self, user_id: str) -> Command:
        """The read ``trim`` takes, for a login's step on the user's index: up to
        ``self.sample`` distinct members, all of them when the set is no larger (one
        command, whose cost the sample bounds, however large the set)."""
        return ("SRANDMEMBER", self.keys.user_sessions(user_id), self.sample)

    async def trim(self, user_id: str, new: tuple[float, str], members: list[str]) -> list[str]:
        """Drop the dead ids among ``members`` (read by ``read_sample`` after the login
        ``new`` = (login time, key id) was added) and end the live sessions beyond
        ``max_per_user``, oldest first, never ``new``. Returns the key ids ended here:
        their hashes are gone, the rest of their state is the caller's to clean up.

        The newest ``max_per_user`` are kept, plus ``new`` should a concurrent login be
        newer: two logins racing under a cap of 1 then keep one session, not none. When
        the sample is not the whole set (a set grown before this upkeep existed),
        sessions are ended only if the sample alone holds more than the cap, so a user
        is never left with fewer; the dead ids it finds go either way.
        """
        others = [m for m in members if m != new[1]]
        if not others:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for m in others:
                # Existence and age at once: login writes login_time with the hash, and
                # login_time is a reserved field nothing else removes.
                pipe.hget(self.keys.session(m), "login_time")
            _READS.inc(len(others))
            started = cast(list[str | None], await pipe.execute())
        dead = [m for m, t in zip(others, started, strict=True) if t is None]
        live = [(_seconds(t), m) for m, t in zip(others, started, strict=True) if t is not None]
        ranked = sorted([*live, new], reverse=True)
        keep = {m for _, m in ranked[: self.max_per_user]} | {new[1]}
        ended = [m for _, m in live if m not in keep]
        if not dead and not ended:
            return []
        key = self.keys.user_sessions(user_id)
        # The hashes go before their ids (in a cluster, as a step of their own: one DEL
        # per key, in their own slots): stopped in between, an id left behind is found
        # dead next time, whereas a live session missing from the index would escape a
        # logout everywhere.
        _WRITES.inc(len(ended) + 1)
        await self.writes.run(
            Spread([("DEL", self.keys.session(m)) for m in ended]),
            [("SREM", key, *dead, *ended)],
            atomic=False,
        )
        metrics.SESSIONS_CAPPED.inc(len(ended))
        return ended

    async def end_all(self, user_id: str) -> AsyncGenerator[list[str]]:
        """End every session in the user's index, in steps of at most ``BATCH``; yields
        the key ids each step ended (their hashes are gone by then). Each step is a
        round trip or two, bounded by the caller.

        The set is first moved to ``user_sessions_ending:<user_id>``; logins after the
        move go to a fresh index and survive. Stopped part-way (a Redis timeout, a crash)
        the rest stays in the ending set, which lives as long as its newest session could
        (``absolute_ttl``), and the next logout everywhere ends it first.
        """
        user_set = self.keys.user_sessions(user_id)
        ending = self.keys.user_sessions_ending(user_id)
        for _ in range(2):
            moved = await _MOVE.run(self.writes.call, [user_set, ending], [self.absolute_ttl])
            async for ids in self._drain(ending):
                yield ids
            # Not moved because an ending set was there: it has just been ended, and
            # the index is moved again. Should another logout everywhere have moved it
            # meanwhile, its set (just ended too) held every session up to a moment
            # after this one began: nothing is left that this logout owes.
            if moved != 0:
                return

    async def _drain(self, ending: str) -> AsyncGenerator[list[str]]:
        _READS.inc()
        ids = cast(list[str], await self.redis.srandmember(ending, BATCH))
        while ids:
            # A batch leaves the ending set only together with (after) its hashes, so
            # whatever a failure interrupts is still listed for the next attempt. SPOP
            # would lose the ids of a reply that timed out.
            # In a cluster, the hashes (one DEL each, in their slots, the nodes at once)
            # then the ending set's step (its slot).
            res = await self.writes.run(
                Spread([("DEL", self.keys.session(m)) for m in ids]),
                [("SREM", ending, *ids), ("SRANDMEMBER", ending, BATCH)],
                atomic=False,
            )
            _WRITES.inc(len(ids) + 1)
            _READS.inc()
            yield ids
            ids = res[1][-1]


def _seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0  # not written by the gateway: counted as the oldest
