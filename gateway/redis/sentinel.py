"""Redis Sentinel: every connection goes to the master the Sentinels name, and only
while they name it.

redis-py's Sentinel support (``SentinelConnectionPool``) looks the master up when a
connection is opened and drops a connection that gets READONLY. Three gaps remain, each
closed here:

- *Which Sentinel to believe.* redis-py takes the first Sentinel that answers; one that
  has not yet heard of a failover names the old master. :class:`Sentinels` asks them all
  at once and believes the answer with the highest ``config-epoch`` (each failover
  raises it), among those that see that master up; at the same epoch, not the Sentinel
  still leading the failover (it names the old master until the end).
- *Connections opened before a failover.* A master demoted by ``SENTINEL FAILOVER``, or
  one that was stopped and resumes, keeps serving its clients as a master until the
  Sentinels reconfigure it, which they do only after 4 times their 2 s publish period: writes
  sent there in between are lost when it becomes a replica. :class:`MasterWatch` asks the
  Sentinels every ``redis.sentinel.check_interval`` seconds; when the master moved, the
  pools close their connections to the old one (idle ones at once, busy ones when they
  are given back) and the listeners (the near-cache's link) are told.
- *The role.* A connection checks ``ROLE`` once connected and refuses a node that is not
  a master, or not the one the watch names now (:class:`MasterConnection`): a stale
  answer naming a replica, or a handshake begun with a stopped master that completes
  after the Sentinels named another, never becomes a connection in use; and the pool
  reconnects a connection that comes back from a caller still connected to an old
  master (:meth:`MasterPool.ensure_connection`).

Connections find the master through the watch (no Sentinel round trip per connection);
the watch asks the Sentinels concurrently, each within redis.timeout, so one stopped
Sentinel delays nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from ..config import SentinelSettings, split_host_port

log = logging.getLogger("gateway.redis")

Address = tuple[str, int]


class NotMaster(RedisConnectionError):
    """A connection reached a node that is not (or no longer) the master."""


class MasterConnection(SentinelManagedConnection):
    """A connection to the address the watch names, refused unless ROLE says master."""

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        await super().on_connect_check_health(check_health)
        await self.send_command("ROLE", check_health=False)
        role = await self.read_response()
        kind = role[0] if isinstance(role, list) and role else role
        if isinstance(kind, bytes):
            kind = kind.decode()
        if kind != "master":
            # The caller's connect() disconnects on a RedisError; the command then
            # fails like any Redis failure (the route's on_redis_error decides).
            raise NotMaster(f"{self.host}:{self.port} is a {kind}, not the master")
        named = getattr(self.connection_pool, "master_address", None)
        if named is not None and named != (self.host, self.port):
            # Begun towards a master that stopped answering, finished after the
            # Sentinels named another while it resumed still believing itself the
            # master (it answers ROLE master until they convert it): not ours.
            raise NotMaster(f"{self.host}:{self.port} is no longer the master ({named})")


class MasterSSLConnection(MasterConnection, SSLConnection):
    pass


class Sentinels(Sentinel):
    """redis-py's Sentinel manager, asking every Sentinel at once and believing the
    newest configuration."""

    def __init__(self, nodes: list[Address], name: str, timeout: float, **kwargs: Any) -> None:
        super().__init__(nodes, **kwargs)
        self.name = name
        self.timeout = timeout
        self.watch: MasterWatch | None = None

    async def discover_master(self, service_name: str) -> Address:
        if self.watch is not None and service_name == self.name:
            return await self.watch.master()
        return await self.ask(service_name)

    async def ask(self, service_name: str) -> Address:
        """The master's address from the Sentinel with the highest config epoch among
        those that answer within the timeout and see the master up."""
        tasks = [
            asyncio.ensure_future(s.sentinel_master(service_name)) for s in self.sentinels
        ]
        done, pending = await asyncio.wait(tasks, timeout=self.timeout)
        for t in pending:
            t.cancel()
        best: dict[str, Any] | None = None
        errors: list[str] = []
        for t in done:
            if t.cancelled():
                continue
            e = t.exception()
            if e is not None:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            state = t.result()
            if not isinstance(state, dict) or not self.check_master_state(state, service_name):
                continue
            if best is None or _rank(state) > _rank(best):
                best = state
        if best is None:
            why = "; ".join(errors[:3]) or "no Sentinel sees it up"
            raise MasterNotFoundError(f"no master for {service_name!r} ({why})")
        return str(best["ip"]), int(best["port"])


def _rank(state: dict[str, Any]) -> tuple[int, bool]:
    """Which Sentinel's answer is newest: the higher config epoch; at the same epoch,
    not the one leading a failover (it takes the new epoch at promotion but names the
    old master until the replicas are reconfigured, while the others already name the
    new one)."""
    return int(state["config-epoch"]), "failover_in_progress" not in str(state["flags"])


class MasterPool(SentinelConnectionPool, BlockingConnectionPool):
    """SentinelConnectionPool's master lookup with BlockingConnectionPool's bounded wait
    for a free connection (as for a single node: the wait counts against
    redis.timeout)."""

    async def ensure_connection(self, connection: Any) -> None:
        """Hand out no connection to a master the Sentinels no longer name: one that was
        busy when the master moved comes back to the pool still connected to the old
        one (redis-py's release does not check), and is reconnected here."""
        await super().ensure_connection(connection)
        if (connection.host, connection.port) != self.master_address:
            await connection.disconnect()
            await super().ensure_connection(connection)

    async def follow(self, address: Address) -> None:
        """The master is at ``address`` now: close the idle connections to another one
        (busy ones are closed when given back: ``owns_connection``)."""
        if self.master_address != address:
            self.master_address = address
            await self.disconnect(inuse_connections=False)


Listener = Callable[[Address], None]


class MasterWatch:
    """Asks the Sentinels where the master is, every ``interval`` seconds, and makes
    the pools and listeners follow it."""

    def __init__(self, sentinels: Sentinels, interval: float) -> None:
        self.sentinels = sentinels
        self.interval = interval
        self.address: Address | None = None
        self.pools: list[MasterPool] = []
        self.listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        sentinels.watch = self

    async def master(self) -> Address:
        """The master's address: the last one found, or asked for now."""
        if self.address is not None:
            return self.address
        return await self.check()

    async def check(self) -> Address:
        async with self._lock:
            address = await self.sentinels.ask(self.sentinels.name)
            if address != self.address:
                old, self.address = self.address, address
                if old is not None:
                    log.warning(
                        "redis master moved: %s:%d -> %s:%d; connections to the old one "
                        "are closed",
                        *old,
                        *address,
                    )
                for pool in self.pools:
                    await pool.follow(address)
                if old is not None:
                    for listener in self.listeners:
                        listener(address)
            return address

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sentinel-watch")

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.check()
                if failing:
                    log.info("sentinels answer again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # Keep the last address: the pools' commands fail on their own if it
                # is gone, and the next round may find the new one.
                if not failing:
                    log.warning("sentinels: %s: %s", type(e).__name__, e)
                failing = True
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.sentinels.aclose()


def sentinels(settings: SentinelSettings, timeout: float, connect_timeout: float,
              tls: dict[str, Any]) -> Sentinels:
    """The Sentinel manager for ``redis.sentinel`` (the Sentinels' own credentials)."""
    nodes = [split_host_port(n) for n in settings.nodes]
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": connect_timeout,
        "decode_responses": True,
        **tls,
    }
    if settings.sentinel_password is not None:
        sentinel_kwargs["password"] = settings.sentinel_password.get_secret_value()
    if settings.sentinel_username is not None:
        sentinel_kwargs["username"] = settings.sentinel_username
    return Sentinels(nodes, settings.master, timeout, sentinel_kwargs=sentinel_kwargs)


def master_pool(
    manager: Sentinels,
    settings: SentinelSettings,
    tls: dict[str, Any],
    **kwargs: Any,
) -> MasterPool:
    """A pool of connections to the current master (``kwargs``: the connection and
    pool options, as for a single node)."""
    if settings.password is not None:
        kwargs["password"] = settings.password.get_secret_value()
    if settings.username is not None:
        kwargs["username"] = settings.username
    connection_class = MasterSSLConnection if tls else MasterConnection
    pool = MasterPool(  # type: ignore[no-untyped-call]
        settings.master,
        manager,
        connection_class=connection_class,
        db=settings.db,
        **tls,
        **kwargs,
    )
    if manager.watch is not None:
        manager.watch.pools.append(pool)
    return pool
