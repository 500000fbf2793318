"""Session reads that arrive in the same event-loop tick go to Redis as one pipeline.

Under load many requests resolve their session at once; one round trip for all of them
costs Redis and this process far less than one call each. A read alone in its tick still
goes out at the end of that tick, so nothing waits for a timer.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from redis.asyncio import Redis

from . import metrics

MAX_BATCH = 256
_SENT = metrics.REDIS_COMMANDS.labels("session_read")


class BatchedReader:
    def __init__(self, redis: Redis, timeout: float) -> None:
        self.redis = redis
        # One timer per batch rather than one per request; every waiter of a batch that
        # runs out of time gets the TimeoutError.
        self.timeout = timeout
        self._queue: list[tuple[str, asyncio.Future[dict[str, str]]]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def hgetall(self, key: str) -> asyncio.Future[dict[str, str]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, str]] = loop.create_future()
        self._queue.append((key, fut))
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

    async def _run(self, batch: list[tuple[str, asyncio.Future[dict[str, str]]]]) -> None:
        _SENT.inc(len(batch))
        try:
            async with asyncio.timeout(self.timeout):
                if len(batch) == 1:
                    results: list[Any] = [await self.redis.hgetall(batch[0][0])]
                else:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for key, _ in batch:
                            pipe.hgetall(key)
                        results = await pipe.execute()
        except BaseException as e:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else ConnectionError(str(e)))
            if not isinstance(e, Exception):
                raise
            return
        for (_, fut), res in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(cast(dict[str, str], res))
