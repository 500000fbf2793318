"""The tracking link: one dedicated RESP3 connection per process that asks Redis to push
an invalidation for every change to a key under a prefix (server-assisted client-side
caching, CLIENT TRACKING in broadcast mode, Redis 6+), and carries this process's
write-behind activity with NOLOOP.

It is Redis plumbing and knows no session: what it learns goes to a ``Listener`` (the
near-cache, sessions/nearcache.py): ``enable`` once tracking is confirmed, ``invalidate``
for every push, ``disable`` as soon as the link is lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from typing import Any, Protocol, cast

import hiredis
from redis._parsers.base import AsyncPushNotificationsParser
from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from .. import metrics
from ..errors import REDIS_FAILURES

log = logging.getLogger("gateway.nearcache")

# Seconds of silence on the link before it is probed with a PING (an unanswered probe
# breaks the link): at most this, or redis.timeout if shorter.
HEARTBEAT = 1.0


class Listener(Protocol):
    def enable(self) -> None: ...
    def disable(self) -> None: ...
    def invalidate(self, keys: list[str] | None) -> None: ...


def set_invalidation_handler(conn: AbstractConnection, handler: Any) -> None:
    """Route RESP3 ``invalidate`` pushes on ``conn`` to ``handler``.

    redis-py has no public way to reach a single connection's push handler (its own
    client-side cache sets it from inside the library): ``_parser`` is private. This is
    the one place the gateway touches it; tests/test_redis_layer.py fails if a redis-py
    release moves it."""
    parser = cast(AsyncPushNotificationsParser, conn._parser)
    parser.set_invalidation_push_handler(handler)  # type: ignore[no-untyped-call]


_PING = hiredis.pack_command(("PING",))
_WINDOW_END = object()
_PROBE = object()


class LinkDown(ConnectionError):
    """The tracking link is not up (or went down during a call): the activity writer
    sends through the pool instead; a session read fails like any Redis failure."""


class TrackingLink:
    """The dedicated connection: tracking on, invalidations in, activity writes out.

    One reader task owns every read on it: replies are matched to callers in order,
    ``invalidate`` pushes go to the cache as they arrive.
    """

    def __init__(
        self, pool: ConnectionPool, prefix: str, listener: Listener, timeout: float
    ) -> None:
        """``pool``: RESP3 connections to the server (or the Sentinels' master); it only
        builds the connection (address, TLS, unix sockets, AUTH, SELECT, the master's
        role), it never hands it out."""
        self.prefix = prefix
        self.listener = listener
        self.timeout = timeout
        self._pool = pool
        self._conn: AbstractConnection | None = None
        # Callers waiting for replies, in send order, each with what its reply starts or
        # ends: a window of our own writes (see call_own_write).
        self._pending: collections.deque[tuple[asyncio.Future[Any], Any]] = collections.deque()
        self._own: frozenset[str] = frozenset()
        self._task: asyncio.Task[None] | None = None
        self._up = False  # tracking confirmed on the current connection
        self._stopping = False
        self._heartbeat = min(HEARTBEAT, timeout)
        self._closing: set[asyncio.Task[None]] = set()
        # Calls in flight that Redis holds on purpose (WAIT) until they can be answered.
        self._blocking = 0

    @property
    def up(self) -> bool:
        return self._up

    @property
    def free(self) -> bool:
        """Up, and no call that Redis holds on purpose (WAIT) is in flight: a read sent
        now is answered without waiting behind one (else the caller reads elsewhere)."""
        return self._up and not self._blocking

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="near-cache-link")

    async def call(self, *args: Any) -> Any:
        """Run one command on the link (raises LinkDown when it is not up)."""
        return await self._send(args, None)

    async def call_blocking(self, *args: Any) -> Any:
        """Run a command that Redis holds until it can answer (WAIT, within its own
        timeout, which the config keeps below redis.timeout); meanwhile the link is not
        ``free``."""
        self._blocking += 1
        try:
            return await self._send(args, None)
        finally:
            self._blocking -= 1

    async def call_own_write(self, keys: frozenset[str], *args: Any) -> Any:
        """Run a script that writes ``keys`` on this process's behalf, so that the
        invalidations it causes don't evict them from our cache.

        NOLOOP alone is not enough: Redis 7.0 attributes a script's writes to its Lua
        client, so they are pushed to us too, after the script's reply and before the
        reply to any command we send once that reply is in. So pushes for ``keys`` are
        ignored from the script's reply until the reply to a PING sent on receiving it;
        where Redis honours NOLOOP for scripts there are none to ignore. The script
        reports the keys it found gone, which the caller invalidates itself.

        The price: another client's change to one of ``keys`` landing in that window
        (one round trip) is missed too, until the copy is renewed by a later flush of
        that session (which reads the hash after the change) or ``max_age`` ends it.
        """
        return await self._send(args, keys)

    async def _send(self, args: tuple[Any, ...], tag: Any) -> Any:
        conn = self._conn
        if conn is None or not self.up:
            raise LinkDown("tracking link is down")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Appended before the bytes go out: replies come back in send order, and
        # send_packed_command writes synchronously before its first await.
        self._pending.append((fut, tag))
        try:
            # hiredis's packer: the same bytes as redis-py's, eight times faster for an
            # activity script call's few hundred arguments (measured 9 vs 77 µs).
            await conn.send_packed_command(hiredis.pack_command(args), check_health=False)
        except BaseException as e:
            fut.cancel()  # nobody will await it
            self._broken("send failed")
            if isinstance(e, Exception):
                # Like any other loss of the link: the caller falls back to the pool.
                raise LinkDown(f"tracking link send failed: {e}") from e
            raise
        try:
            async with asyncio.timeout(self.timeout):
                return await fut
        except TimeoutError:
            # An unanswered link is a broken link: off with the cache, and the caller
            # (activity) falls back to the pool; its batch id makes a re-send safe.
            self._broken("call unanswered")
            raise LinkDown("tracking link did not answer in time") from None

    async def _run(self) -> None:
        delay = 0.1
        while not self._stopping:
            try:
                await self._session()
                delay = 0.1
            except asyncio.CancelledError:
                raise
            except ResponseError as e:
                # Redis < 6 (no CLIENT TRACKING), or RESP3 refused: no near-cache.
                log.warning("near-cache off: Redis refused tracking (%s)", e)
                self._broken(str(e))
                return
            except REDIS_FAILURES as e:
                if self.up or delay == 0.1:
                    log.warning("near-cache link lost (%s: %s); cache off", type(e).__name__, e)
                self._broken(str(e))
            except Exception as e:
                # Whatever it was, the cache must not stay on without its link.
                log.exception("near-cache link failed; cache off")
                self._broken(f"{type(e).__name__}: {e}")
            if self._stopping:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _session(self) -> None:
        conn: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        self._conn = conn
        # Under Sentinel this asks the watch for the master and checks ROLE (sentinel.py).
        await conn.connect()  # type: ignore[no-untyped-call]
        set_invalidation_handler(conn, self._on_invalidate)
        await conn.send_command(
            "CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", self.prefix, "NOLOOP"
        )
        # No explicit timeout: redis-py then raises on socket_timeout (with one, it would
        # return None and the cache would go on without tracking being confirmed).
        reply = await conn.read_response()
        if reply != "OK":
            raise ConnectionError(f"CLIENT TRACKING answered {reply!r}")
        self.listener.enable()
        self._up = True
        log.info("near-cache on (tracking %s*)", self.prefix)
        probing: asyncio.Future[Any] | None = None
        while not self._stopping:
            error: ResponseError | None = None
            silent = False
            try:
                # Our own timer, so that a nil reply is never mistaken for silence.
                async with asyncio.timeout(self._heartbeat):
                    reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
            except TimeoutError:
                silent = True
            except ResponseError as e:
                reply, error = None, e
            if silent:
                if self._blocking:
                    # Replies wait behind a WAIT that Redis holds on purpose, for longer
                    # than the heartbeat when wait.timeout is; that call's own deadline
                    # (redis.timeout) bounds the silence.
                    continue
                if probing is not None:
                    raise TimeoutError("heartbeat unanswered")
                probing = asyncio.get_running_loop().create_future()
                self._pending.append((probing, _PROBE))
                await conn.send_packed_command(_PING, check_health=False)
                continue
            if not self._pending:
                raise ConnectionError("a reply nobody asked for: replies and callers out of step")
            fut, tag = self._pending.popleft()
            if tag is _WINDOW_END:
                self._own = frozenset()
            elif tag is not None and tag is not _PROBE:
                self._own = tag
                end: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                self._pending.append((end, _WINDOW_END))
                await conn.send_packed_command(_PING, check_health=False)
            if fut is probing:
                probing = None
            if fut.done():
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(reply)

    async def _on_invalidate(self, message: list[Any]) -> None:
        keys = message[1] if len(message) > 1 else None
        if keys is not None and self._own:
            keys = [k for k in keys if k not in self._own]
            if not keys:
                return
        self.listener.invalidate(list(keys) if keys is not None else None)
        metrics.NEAR_CACHE_INVALIDATIONS.inc(len(keys) if keys is not None else 1)

    def master_moved(self, address: tuple[str, int]) -> None:
        """The Sentinels name another master: a link still on the old one breaks (the
        cache is emptied) and reconnects to the new one, where tracking starts afresh."""
        conn = self._conn
        if conn is not None and (getattr(conn, "host", None), getattr(conn, "port", None)) != (
            address
        ):
            self._broken("the master moved")

    def _broken(self, why: str) -> None:
        self.listener.disable()
        self._up = False
        conn, self._conn = self._conn, None
        self._own = frozenset()
        while self._pending:
            fut, tag = self._pending.popleft()
            if fut.done():
                continue
            if tag is _WINDOW_END or tag is _PROBE:
                fut.cancel()  # nobody awaits these
            else:
                fut.set_exception(LinkDown(f"tracking link lost: {why}"))
        if conn is not None:
            task = asyncio.get_running_loop().create_task(conn.disconnect(nowait=True))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._broken("stopped")
        if self._closing:
            await asyncio.wait(self._closing, timeout=1.0)
        await self._pool.disconnect()
