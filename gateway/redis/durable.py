"""Writes that decide who holds a session (login, logout, logout everywhere, token
rotation), made as steps that each touch one slot, optionally followed by WAIT.

On one node (``redis.url`` or ``redis.sentinel``) a call's steps run as one MULTI/EXEC:
all of them or none. In a cluster each step is a transaction of its own on the master of
its slot, run in the order given; the caller says in a comment, step by step, what still
holds when the sequence stops between two (a timeout, a master lost).

``redis.wait: {replicas: N, timeout: T}``: each transaction is followed, on the same
connection, by ``WAIT N T`` (WAIT counts the replicas that have the writes of the
connection it is sent on). Fewer than N acknowledgements raise :class:`NotReplicated`, a
Redis failure like a timeout: the caller answers 503, so a login or logout is never
acknowledged before N replicas hold it. Replication stays asynchronous: a master that
dies before the WAIT can still lose the write, but then nobody was told it happened
(README, Operations, "Durable logins and logouts").

Without ``redis.wait`` the steps go through redis-py's pipelines as before; with it, a
connection is taken from the pool (or, in a cluster, from the node of the step's slot)
for the transaction and its WAIT, through redis-py's public connection API.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError, ResponseError

from .. import metrics
from ..config import WaitSettings

log = logging.getLogger("gateway.redis")

Command = tuple[Any, ...]
_KEYLESS = frozenset({"MULTI", "EXEC", "WAIT", "SCRIPT"})


class NotReplicated(RedisError):
    """WAIT came back with fewer replicas than ``redis.wait.replicas``."""


class Spread:
    """Independent single-key writes (a batch of DELs) that may touch any slots: on one
    node they join the transaction; in a cluster they are grouped by node and sent to
    the nodes at once, each node's group followed by its WAIT."""

    __slots__ = ("commands",)

    def __init__(self, commands: Sequence[Command]) -> None:
        self.commands = list(commands)


Step = Sequence[Command] | Spread


def key_of(command: Command) -> str:
    """The (first) key of a command: what its slot is."""
    name = str(command[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        return str(command[3])
    return str(command[1])


def _commands(step: Step) -> list[Command]:
    return step.commands if isinstance(step, Spread) else list(step)


class Writes:
    def __init__(self, client: Redis | RedisCluster, wait: WaitSettings | None = None) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self.wait = wait
        self._probes: set[asyncio.Task[Any]] = set()

    async def run(self, *steps: Step, atomic: bool = True) -> list[list[Any]]:
        """Run ``steps``; one result list per step. On one node they are a single
        transaction (``atomic``; else one pipeline). The first error reply raises, once
        every reply (and the WAIT) has been read."""
        if not self.cluster:
            flat = [c for s in steps for c in _commands(s)]
            results = await self._one_node(flat, atomic) if flat else []
            out: list[list[Any]] = []
            i = 0
            for s in steps:
                n = len(_commands(s))
                out.append(results[i : i + n])
                i += n
            return out
        out = []
        for s in steps:
            if isinstance(s, Spread):
                res = await self.spread(s.commands)
                _raise_first(res)
                out.append(res)
            elif s:
                out.append(await self._slot(list(s)))
            else:
                out.append([])
        return out

    async def call(self, *command: Any) -> Any:
        """One command (a script call) on its slot, then WAIT: the ``execute`` of a
        Script (scripts.py) whose writes must be durable. SCRIPT LOAD writes nothing to
        wait for, and a cluster client sends it to every master."""
        if self.wait is None or str(command[0]).upper() == "SCRIPT":
            return await self.client.execute_command(*command)
        return (await self.run([command], atomic=False))[0][0]

    async def close(self) -> None:
        for task in list(self._probes):
            task.cancel()
        if self._probes:
            await asyncio.wait(self._probes, timeout=1.0)

    async def spread(self, commands: Sequence[Command]) -> list[Any]:
        """Single-key commands in any slots, in one round trip per node (the nodes at
        once); one result per command, an exception object in place of one that failed
        (its node's NotReplicated, when the WAIT fell short)."""
        if not commands:
            return []
        if self.wait is None:
            async with self.client.pipeline(transaction=False) as pipe:
                for c in commands:
                    pipe.execute_command(*c)
                return list(await pipe.execute(raise_on_error=False))
        if not self.cluster:
            try:
                return await self._raw(self._pool_connection(), list(commands), atomic=False)
            except RedisError as e:
                return [e] * len(commands)
        assert isinstance(self.client, RedisCluster)
        await self.client.initialize()
        groups: dict[str, list[int]] = {}
        nodes: dict[str, Any] = {}
        for i, c in enumerate(commands):
            node = self.client.get_node_from_key(key_of(c))
            if node is None:
                raise RedisError(f"no node for {key_of(c)!r}")
            nodes[node.name] = node
            groups.setdefault(node.name, []).append(i)

        async def one(name: str) -> list[Any]:
            idx = groups[name]
            try:
                return await self._raw(
                    self._node_connection(nodes[name]), [commands[i] for i in idx], atomic=False
                )
            except RedisError as e:
                self._probe(key_of(commands[idx[0]]))
                return [e] * len(idx)

        out: list[Any] = [None] * len(commands)
        for name, res in zip(groups, await asyncio.gather(*(one(n) for n in groups)), strict=True):
            for i, r in zip(groups[name], res, strict=True):
                out[i] = r
        return out

    # -- one node -------------------------------------------------------------------

    async def _one_node(self, commands: list[Command], atomic: bool) -> list[Any]:
        if self.wait is None:
            if len(commands) == 1 and not atomic:
                return [await self.client.execute_command(*commands[0])]
            async with self.client.pipeline(transaction=atomic) as pipe:
                for c in commands:
                    pipe.execute_command(*c)
                return list(await pipe.execute())
        res = await self._raw(self._pool_connection(), commands, atomic)
        _raise_first(res)
        return res

    # -- one slot of a cluster ------------------------------------------------------------

    async def _slot(self, commands: list[Command]) -> list[Any]:
        assert isinstance(self.client, RedisCluster)
        if self.wait is None:
            if len(commands) == 1:
                return [await self.client.execute_command(*commands[0])]
            async with self.client.pipeline(transaction=True) as pipe:
                for c in commands:
                    pipe.execute_command(*c)
                return list(await pipe.execute())
        await self.client.initialize()
        key = key_of(commands[0])
        node = self.client.get_node_from_key(key)
        if node is None:
            raise RedisError(f"no node for {key!r}")
        try:
            res = await self._raw(self._node_connection(node), commands, len(commands) > 1)
        except RedisError:
            self._probe(key)
            raise
        _raise_first(res)
        return res

    def _probe(self, key: str) -> None:
        """After a failure on a connection of our own, one ordinary command on the same
        key, in the background: redis-py then follows a MOVED or re-reads the topology
        after a lost node, which the next step needs."""
        assert isinstance(self.client, RedisCluster)

        async def probe() -> None:
            try:
                async with asyncio.timeout(2.0):
                    await self.client.execute_command("EXISTS", key)
            except Exception as e:  # only a side effect is wanted
                log.debug("cluster probe of %s failed: %s", key, e)

        task = asyncio.create_task(probe())
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    # -- a connection of our own, for a transaction and its WAIT -------------------------

    @asynccontextmanager
    async def _pool_connection(self) -> AsyncIterator[AbstractConnection]:
        assert isinstance(self.client, Redis)
        pool = self.client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            yield conn
        except BaseException:
            # Replies may still be on their way: the connection is not reusable.
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    @asynccontextmanager
    async def _node_connection(self, node: Any) -> AsyncIterator[AbstractConnection]:
        conn = node.acquire_connection()
        try:
            yield conn
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            node.release(conn)

    async def _raw(self, connection: Any, commands: list[Command], atomic: bool) -> list[Any]:
        """``commands`` (in MULTI/EXEC when ``atomic``) and WAIT, sent at once on one
        connection; their replies, error replies as exception objects."""
        wait = self.wait
        assert wait is not None
        packed: list[Command] = [("MULTI",)] if atomic else []
        packed += commands
        if atomic:
            packed.append(("EXEC",))
        packed.append(("WAIT", wait.replicas, max(1, round(wait.timeout * 1000))))
        async with connection as conn:
            await conn.send_packed_command(conn.pack_commands(packed))
            replies: list[Any] = []
            for _ in packed:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as e:
                    replies.append(e)
        acks = replies[-1]
        if atomic:
            results = replies[-2]
            if isinstance(results, Exception):
                raise results  # EXECABORT: a command was refused while queued
            if not isinstance(results, list):
                raise RedisError(f"EXEC answered {results!r}")
        else:
            results = replies[:-1]
        if isinstance(acks, Exception):
            raise acks
        if int(acks) < wait.replicas:
            metrics.REDIS_WAITS.labels("short").inc()
            raise NotReplicated(
                f"WAIT: {acks} of {wait.replicas} replicas acknowledged within "
                f"{wait.timeout:g}s"
            )
        metrics.REDIS_WAITS.labels("ok").inc()
        return list(results)


def _raise_first(results: list[Any]) -> None:
    for r in results:
        if isinstance(r, Exception):
            raise r
