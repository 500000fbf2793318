"""The rollback window's writes: logins and logouts made through the gateway, copied to
the legacy table behind the requests that made them, in batches, in order.

Bounded: at most ``max_pending`` writes wait (past it a new one is dropped, logged and
counted); a batch the database refuses is retried whole, in place, with a growing pause
(up to ``max_backoff``), up to ``max_attempts`` times, then dropped and counted.
Statements should be idempotent (an ``ON CONFLICT DO NOTHING`` insert, a delete): a
batch that timed out after the database committed it is written again. Activity is
never written here.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .config import Rollback
from .database import DATABASE_FAILURES, LegacyDatabase

log = logging.getLogger("plugins.legacy_sessions")

Kind = Literal["login", "logout"]


@dataclass(slots=True)
class _Write:
    kind: Kind
    args: tuple[Any, ...]


class WriteBehind:
    def __init__(
        self,
        db: LegacyDatabase,
        config: Rollback,
        timeout: float,
        counted: Callable[[Kind, str, int], None],
    ) -> None:
        self.db = db
        self.config = config
        self.timeout = timeout
        # (kind, outcome, n): written, failed (a batch refused once), dropped.
        self.counted = counted
        self._queue: deque[_Write] = deque()
        self._attempts = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, kind: Kind, values: Mapping[str, Any]) -> None:
        """Queue one write; ``values`` names every parameter of its statement."""
        stmt = self.config.login if kind == "login" else self.config.logout
        if len(self._queue) >= self.config.max_pending:
            self.counted(kind, "dropped", 1)
            log.warning("legacy_sessions: %s write dropped, %d waiting", kind, len(self._queue))
            return
        self._queue.append(_Write(kind, tuple(values.get(p) for p in stmt.params)))
        if len(self._queue) >= self.config.batch_size:
            self._wake.set()

    def pending(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="legacy-sessions-writeback")

    async def stop(self, seconds: float) -> None:
        """Stop the loop; write what waits, for at most ``seconds``."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            async with asyncio.timeout(seconds):
                while self._queue and await self.flush():
                    pass
        except TimeoutError:
            pass
        if self._queue:
            for w in self._queue:
                self.counted(w.kind, "dropped", 1)
            log.warning("legacy_sessions: %d writes not made at shutdown", len(self._queue))
            self._queue.clear()

    async def _run(self) -> None:
        cfg = self.config
        while True:
            if self._attempts:
                # The database refused the last batch: back off, whatever is queued.
                pause = cfg.flush_interval * 2 ** min(self._attempts, 16)
                await asyncio.sleep(min(cfg.max_backoff, pause))
            else:
                try:
                    async with asyncio.timeout(cfg.flush_interval):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            while self._queue and await self.flush():
                pass

    async def flush(self) -> bool:
        """Write one batch (the oldest writes); False when the database refused it."""
        batch = [self._queue[i] for i in range(min(len(self._queue), self.config.batch_size))]
        if not batch:
            return True
        # Consecutive writes of one kind go in one executemany; the order is kept.
        groups: list[tuple[str, list[tuple[Any, ...]]]] = []
        kinds: list[Kind] = []
        for w in batch:
            sql = (self.config.login if w.kind == "login" else self.config.logout).sql
            if groups and kinds[-1] == w.kind:
                groups[-1][1].append(w.args)
            else:
                groups.append((sql, [w.args]))
                kinds.append(w.kind)
        try:
            async with asyncio.timeout(self.timeout):
                await self.db.write(groups)
        except DATABASE_FAILURES as e:
            self._attempts += 1
            for kind, (_, rows) in zip(kinds, groups, strict=True):
                self.counted(kind, "failed", len(rows))
            if self._attempts < self.config.max_attempts:
                log.warning(
                    "legacy_sessions: %d writes failed (attempt %d): %s: %s",
                    len(batch),
                    self._attempts,
                    type(e).__name__,
                    e,
                )
                return False
            log.error(
                "legacy_sessions: %d writes dropped after %d attempts", len(batch), self._attempts
            )
            for kind, (_, rows) in zip(kinds, groups, strict=True):
                self.counted(kind, "dropped", len(rows))
        else:
            for kind, (_, rows) in zip(kinds, groups, strict=True):
                self.counted(kind, "written", len(rows))
        self._attempts = 0
        for _ in batch:
            self._queue.popleft()
        return True
