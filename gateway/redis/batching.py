"""Session reads that arrive in the same event-loop tick go to Redis as one pipeline.

Under load many requests resolve their session at once; one round trip for all of them
costs Redis and this process far less than one call each. A read alone in its tick still
goes out at the end of that tick, so nothing waits for a timer.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from .. import metrics
from .client import RedisClient

MAX_BATCH = 256
_SENT = metrics.REDIS_COMMANDS.labels("session_read")


Command = tuple[str, ...]
# The session hash, then one result per extra command (an exception object where that
# command failed: a plugin's read must not fail the session lookup).
ReadResult = tuple[dict[str, str], list[Any]]


class BatchedReader:
    def __init__(self, redis: RedisClient, timeout: float) -> None:
        self.redis = redis
        # One timer per batch rather than one per request; every waiter of a batch that
        # runs out of time gets the TimeoutError.
        self.timeout = timeout
        self._queue: list[tuple[str | None, tuple[Command, ...], asyncio.Future[ReadResult]]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def hgetall(
        self, key: str | None, extra: tuple[Command, ...] = ()
    ) -> asyncio.Future[ReadResult]:
        """The hash at ``key`` plus the results of ``extra`` commands (plugins' reads for
        the same request), all in the tick's one pipeline. ``key`` None: only ``extra``
        (the session came from the near-cache); the hash is then ``{}``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ReadResult] = loop.create_future()
        self._queue.append((key, extra, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._dispatch)
        return fut

    def _dispatch(self) -> None:
        self._scheduled = False
        queue, self._queue = self._queue, []
        for i in range(0, len(queue), MAX_BATCH):
            task = asyncio.create_task(self._run(queue[i : i + MAX_BATCH]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(
        self, batch: list[tuple[str | None, tuple[Command, ...], asyncio.Future[ReadResult]]]
    ) -> None:
        _SENT.inc(sum((key is not None) + len(extra) for key, extra, _ in batch))
        try:
            async with asyncio.timeout(self.timeout):
                key0 = batch[0][0]
                if len(batch) == 1 and not batch[0][1] and key0 is not None:
                    results: list[Any] = [await self.redis.hgetall(key0)]
                else:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for key, extra, _ in batch:
                            if key is not None:
                                pipe.hgetall(key)
                            for cmd in extra:
                                pipe.execute_command(*cmd)
                        results = await pipe.execute(raise_on_error=False)
        except BaseException as e:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else ConnectionError(str(e)))
            if not isinstance(e, Exception):
                raise
            return
        i = 0
        for key, extra, fut in batch:
            if key is None:
                fields: Any = {}
            else:
                fields = results[i]
                i += 1
            others = results[i : i + len(extra)]
            i += len(extra)
            if fut.done():
                continue
            if isinstance(fields, Exception):
                fut.set_exception(fields)
            else:
                fut.set_result((cast(dict[str, str], fields), list(others)))
