"""Reload on SIGHUP: routes, upstreams, path rules, plugins' options and the log level
(and the access log switch) change without a restart, without dropping a connection or
a request.

The file is read and checked as ``--check`` does (configcheck.py); an invalid one is
refused with the same one-line error, logged, and the running config stays. Settings
the running process holds and cannot change (the listen address, Redis, workers,
limits, sessions, ...) keep their running values, and the log names those that differ.

The swap: a new RouteTable (upstreams whose settings are unchanged keep their objects,
warm pools and ejections) and, when ``plugins:`` changed, a new plugin chain, started
first; then both are put in place at once, between two requests. A request reads the
table once at its start (proxy.py), and the table counts the requests begun on it; the
old table's pools are closed, and the old chain shut down, once those requests are done
(or after ``shutdown_timeout``; a pool closed under a request still finishes it, its
connection closes on release). With workers, the supervisor forwards SIGHUP and each
worker reloads for itself.

A request in flight across a swap may run its later plugin hooks on the new chain's
instances (same names, new options): plugins keep per-request state on the request's
context by name, so that is safe for a plugin whose options changed; one added by the
reload sees requests that its earlier hooks never saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from . import metrics
from .access_log import AccessLog
from .chain import Chain, build_chain
from .config import ConfigError, Settings
from .configcheck import load_checked
from .instructions import Applier
from .plugin import Services
from .routing import RouteTable
from .runtime import Runtime

log = logging.getLogger("gateway.reload")

# What a reload takes from the new file; everything else keeps its running value.
SWAPPED = ("routes", "upstreams", "plugins", "paths")
SWAPPED_LOGGING = ("level", "access_log")
POLL = 0.05  # seconds between looks at an old table's requests in flight


def _same(settings: Settings) -> Settings:
    return settings


@dataclass(frozen=True)
class ConfigSource:
    """Where the running config came from and how this process adapted it."""

    path: str
    # As read from the file at start, before ``prepare``.
    started: Settings
    # What this process changes in a file's settings (a worker takes the supervisor's
    # Redis URL): applied to the reloaded file too.
    prepare: Callable[[Settings], Settings] = field(default=_same)
    # --log-level given on the command line wins over the file's.
    log_level: str | None = None


def restart_only_differences(old: Settings, new: Settings) -> list[str]:
    """Dotted names of the settings that differ and that a reload does not apply."""
    out: list[str] = []
    for name in type(old).model_fields:
        if name in SWAPPED:
            continue
        a, b = getattr(old, name), getattr(new, name)
        if name == "logging":
            out += [
                f"logging.{k}"
                for k in type(a).model_fields
                if k not in SWAPPED_LOGGING and getattr(a, k) != getattr(b, k)
            ]
        elif a != b:
            out += _differences(name, a, b)
    return out


def _differences(path: str, a: Any, b: Any) -> list[str]:
    """``path`` itself, or its fields that differ when both are settings objects (names
    only: values may be secrets)."""
    if isinstance(a, BaseModel) and type(a) is type(b):
        found = [
            d
            for k in type(a).model_fields
            if getattr(a, k) != getattr(b, k)
            for d in _differences(f"{path}.{k}", getattr(a, k), getattr(b, k))
        ]
        return found or [path]
    return [path]


class _Retired:
    """A table (and the chain swapped out with it, if any) still in use by requests."""

    def __init__(self, table: RouteTable, chain: Chain | None, successor: RouteTable) -> None:
        self.table = table
        self.chain = chain
        self.successor = successor

    async def wait(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        # A plain count polled, not an Event: the request path only adds and subtracts.
        while self.table.inflight > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(POLL)
        if self.table.inflight > 0:
            log.warning(
                "reload: %d requests still on the old routes after %.0fs; closing its "
                "pools under them",
                self.table.inflight,
                limit,
            )

    async def close(self) -> None:
        self.table.close(keep=self.successor.upstreams)
        if self.chain is not None:
            await self.chain.drain(5.0)
            await self.chain.shutdown()


class Reloader:
    def __init__(self, runtime: Runtime, source: ConfigSource) -> None:
        self.rt = runtime
        self.source = source
        self._lock = asyncio.Lock()
        self._queued = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retired: set[_Retired] = set()
        self._closed = False

    def trigger(self) -> None:
        """The SIGHUP handler: a reload soon (one more at most while one runs)."""
        if self._closed or self._queued:
            return
        self._queued = True
        self._spawn(self._triggered())

    async def _triggered(self) -> None:
        async with self._lock:
            self._queued = False
            if not self._closed:
                await self.reload()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> bool:
        """Read the file and swap what may change; False when it was refused."""
        path = self.source.path
        try:
            file_settings, _ = load_checked(path)
        except ConfigError as e:
            # The line --check prints, and the old config stays.
            log.error("config error: %s (reload refused; the running config stays)", e)
            metrics.RELOADS.labels("refused").inc()
            return False
        fixed = restart_only_differences(self.source.started, file_settings)
        if fixed:
            log.warning(
                "reload: %s changed in %s but cannot change while running; the running "
                "values stay until a restart",
                ", ".join(fixed),
                path,
            )
        new = self.source.prepare(file_settings)
        rt = self.rt
        running = rt.settings
        applied = running.model_copy(
            update={
                **{name: getattr(new, name) for name in SWAPPED},
                "logging": running.logging.model_copy(
                    update={k: getattr(new.logging, k) for k in SWAPPED_LOGGING}
                ),
            }
        )
        chain: Chain | None = None
        if applied.plugins != running.plugins:
            redis = rt.redis
            services = Services(applied, redis.client, redis.keys, redis.timeout, redis.script)
            try:
                chain = build_chain(applied, services)
                await chain.startup()
            except Exception as e:
                log.error(
                    "reload refused: the new plugins did not start: %s: %s; the running "
                    "config stays",
                    type(e).__name__,
                    e,
                )
                metrics.RELOADS.labels("refused").inc()
                return False
        old_table, old_chain = rt.table, rt.chain
        table = RouteTable(applied, reuse=old_table.upstreams)
        self._swap(applied, table, chain)
        retired = _Retired(old_table, old_chain if chain is not None else None, table)
        self._retired.add(retired)
        self._spawn(self._retire(retired, running.shutdown_timeout))
        kept = [n for n, u in table.upstreams.items() if old_table.upstreams.get(n) is u]
        log.info(
            "config reloaded from %s: %d routes, upstreams %s (unchanged: %s), plugins %s%s",
            path,
            len(applied.routes),
            ", ".join(table.upstreams) or "none",
            ", ".join(kept) or "none",
            ", ".join(n for n, _ in applied.plugin_entries()) or "none",
            " (restarted)" if chain is not None else " (unchanged)",
        )
        metrics.RELOADS.labels("ok").inc()
        return True

    def _swap(self, applied: Settings, table: RouteTable, chain: Chain | None) -> None:
        """Everything that holds the table, the chain or the swapped settings, at once
        (no await in here: no request sees half of it)."""
        rt = self.rt
        gateway = rt.gateway
        rt.settings = applied
        gateway.settings = applied
        rt.table = gateway.table = table
        gateway.access = AccessLog() if applied.logging.access_log else None
        if chain is not None:
            sessions = rt.sessions
            rt.chain = gateway.chain = chain
            sessions.actions.chain = chain
            sessions.resolver.chain = chain
            gateway.instructions = Applier(
                sessions.actions, chain, sessions.cookie, chain.instructions
            )
        level = self.source.log_level or applied.logging.level
        logging.getLogger().setLevel(level)

    async def _retire(self, retired: _Retired, limit: float) -> None:
        try:
            await retired.wait(limit)
        finally:
            if retired in self._retired:
                self._retired.discard(retired)
                await retired.close()

    async def close(self) -> None:
        """At shutdown, once no request is left: no more reloads; what was swapped out
        is closed now."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._retired:
            await self._retired.pop().close()
