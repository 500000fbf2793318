"""Per-client limits kept in this process (hardening, issue 10)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class TooMany(Exception):
    """This client already holds as many as it may."""


class AddressHolds:
    """How many upstream connections each client address (bucket) holds right now, at
    most ``limit`` each: one client cannot take every pooled connection, however many
    sockets it opens. Entries exist only while held, so the dict is bounded by the
    requests in flight."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        n = self._held.get(key, 0)
        if n >= self.limit:
            raise TooMany(key)
        self._held[key] = n + 1
        try:
            yield
        finally:
            n = self._held[key] - 1
            if n:
                self._held[key] = n
            else:
                del self._held[key]
