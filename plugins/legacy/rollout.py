"""Which visitors the gateway keeps sessions for during a rollout: a stable bucket per
legacy session token (0-99, from SHA-256, so no one can pick theirs short of picking a
token the legacy app never issued), compared with the percentage."""

from __future__ import annotations

import hashlib
import secrets

BUCKETS = 100


def bucket(token: str) -> int:
    digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def chosen(token: str, percent: int) -> bool:
    """This legacy session's visitor goes through the gateway's sessions."""
    return bucket(token) < percent


def token_in_bucket(target: int, nbytes: int) -> str:
    """A new random legacy token whose bucket is ``target``, so a visitor keeps their
    bucket when the gateway rotates their legacy token (a login in the rollback window):
    otherwise a login could move them to the other side of the rollout. About 100 draws
    (~0.1 ms); the token keeps its entropy but for the ~6.6 bits of the bucket."""
    for _ in range(100 * BUCKETS):
        token = secrets.token_urlsafe(nbytes)
        if bucket(token) == target:
            return token
    raise RuntimeError("no token found for the bucket")  # pragma: no cover - p < 1e-40


def random_bucket(below: int) -> int:
    """A bucket among the first ``below`` (those a rollout at ``below`` % chooses)."""
    return secrets.randbelow(max(1, min(below, BUCKETS)))
