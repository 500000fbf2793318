"""Every Redis key name the gateway and its plugins use, made in one place.

The layout is contract (DESIGN.md): ``session:<id>``, ``cart:<id>``,
``user_sessions:<user_id>``, all under ``session.key_prefix``. Plugins ask for their keys
here (``keys.of("cart", key_id)``) rather than concatenating strings, so the prefix and
the hash tags apply to them too.

Hash tags (for Redis Cluster; off for a single node): every key about one session carries the
session's key id as its tag (``session:{<id>}``, ``cart:{<id>}``, ``viewed:{<id>}``), so
what one request touches about one session lives in one slot; every key about one user
carries the user's (``user_sessions:{u:<uid>}``); the user's tag is prefixed so that a
user id can never name a session's slot on purpose. Off, the names are the case study's.
"""

from __future__ import annotations

import functools
import hashlib


# Memoized: every session request hashes its cookie, and on this machine one
# hashlib.sha256 call (OpenSSL 3 looks the digest up on each) cost ~2 % of a proxied
# request's CPU in a py-spy profile. Bounded like the near-cache it feeds (a miss costs
# one hash more, nothing else); a token is a pure function of itself, so nothing stale
# can be served from here.
@functools.lru_cache(maxsize=16_384)
def public_id(token: str) -> str:
    """SHA-256 of a cookie token: the session's public id (X-Session-Id), and what its
    keys are named by (a Redis dump then holds no live cookie; cf. Rack CVE-2019-16782)."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def glob_escape(text: str) -> str:
    """``text`` matched literally by a SCAN/KEYS glob pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def hash_tag(key: str) -> str:
    """A tag that puts another key in ``key``'s cluster slot: ``key``'s own hash tag
    (the first ``{...}``, not empty), else the whole key in braces (Redis hashes a tag's
    content alone, so ``{k}`` is in the slot of ``k`` when ``k`` has no tag)."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start : end + 1]
    return f"{{{key}}}"


class Keys:
    def __init__(self, prefix: str = "", *, raw_tokens: bool = False, hash_tags: bool = False):
        self.prefix = prefix
        self.raw_tokens = raw_tokens
        self.hash_tags = hash_tags

    def key_id(self, token: str) -> str:
        """What a session's keys are named by: SHA-256 of its token, or with
        ``session.raw_token_keys`` (existing case-study data only) the token itself."""
        return token if self.raw_tokens else public_id(token)

    def _tag(self, key_id: str) -> str:
        return f"{{{key_id}}}" if self.hash_tags else key_id

    def _user_tag(self, user_id: str) -> str:
        return f"{{u:{user_id}}}" if self.hash_tags else user_id

    # -- one session ------------------------------------------------------------------

    def session(self, key_id: str) -> str:
        return f"{self.prefix}session:{self._tag(key_id)}"

    def session_prefix(self) -> str:
        """What every session key starts with (near-cache tracking is by prefix)."""
        return f"{self.prefix}session:"

    def of(self, kind: str, key_id: str) -> str:
        """A plugin's key about one session (``cart``, ``viewed``): in the session's
        slot."""
        return f"{self.prefix}{kind}:{self._tag(key_id)}"

    # -- one user ---------------------------------------------------------------------

    def user_sessions(self, user_id: str) -> str:
        return f"{self.prefix}user_sessions:{self._user_tag(user_id)}"

    def user_sessions_ending(self, user_id: str) -> str:
        """A logout everywhere's set being ended (sessions/users.py). Its family name is
        no ``user_sessions:`` name for any user id (ids come from the backend and may
        hold ``:``); under hash tags it shares the user set's slot, as RENAMENX needs."""
        return f"{self.prefix}user_sessions_ending:{self._user_tag(user_id)}"

    def of_user(self, kind: str, user_id: str) -> str:
        """A plugin's key about one user (``user_cart``): in the user's slot."""
        return f"{self.prefix}{kind}:{self._user_tag(user_id)}"

    # -- the gateway's own, and shared ones -------------------------------------------

    def activity_batch(self, batch_id: str, slot_key: str | None = None) -> str:
        """The marker an activity flush claims so that a retried batch is applied once.
        Under hash tags it carries the tag of ``slot_key`` (a session of the batch): a
        script's keys must all be in one slot."""
        if self.hash_tags and slot_key is not None:
            return f"{self.prefix}gw:activity:{hash_tag(slot_key)}:{batch_id}"
        return f"{self.prefix}gw:activity:{batch_id}"

    def guest_counter(self, bucket: str) -> str:
        """Guests created from one client address this minute."""
        return f"{self.prefix}gw:guests:{bucket}"

    def probe(self, who: str) -> str:
        """The key a readiness or health check writes (one per process, short TTL)."""
        return f"{self.prefix}gw:probe:{who}"

    def named(self, name: str) -> str:
        """A key shared by every session (a ranking, a cache entry, a rate limit log)."""
        return f"{self.prefix}{name}"
