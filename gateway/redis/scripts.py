"""Lua scripts, called one way: EVALSHA, and on NOSCRIPT (Redis restarted, flushed, or
failed over to a node that never saw it) SCRIPT LOAD and EVALSHA again. Nothing ran when
NOSCRIPT came back, so the second call is safe for any script.

redis-py's ``register_script`` does the same for plain calls but adds a SCRIPT EXISTS
round trip inside pipelines, and cannot send through the near-cache's own connection;
this helper takes the function that executes a command, so the same script object
serves the pool, a pipeline-free link, or (later) a cluster node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.exceptions import NoScriptError

from .. import metrics

Execute = Callable[..., Awaitable[Any]]
Arg = str | int | float | bytes


class Script:
    def __init__(self, source: str, op: str | None = None) -> None:
        """``op``: the gateway_redis_commands_total label its calls count under (the
        core's session and activity scripts; plugins count their own)."""
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis's script id
        self._sent = metrics.REDIS_COMMANDS.labels(op) if op else None

    async def run(
        self,
        execute: Execute,
        keys: Sequence[str],
        args: Sequence[Arg] = (),
        *,
        load: Execute | None = None,
    ) -> Any:
        """Run with ``execute`` (e.g. ``client.execute_command``); ``load`` sends the
        SCRIPT LOAD when that must go another way than the EVALSHA (the near-cache link
        sends a script's writes through a call that marks them as its own)."""
        if self._sent is not None:
            self._sent.inc()
        try:
            return await execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await (load or execute)("SCRIPT", "LOAD", self.source)
            if self._sent is not None:
                self._sent.inc()
            return await execute("EVALSHA", self.sha, len(keys), *keys, *args)


class BoundScript:
    """A script and the client it runs on: ``await script(keys=[...], args=[...])``."""

    def __init__(self, script: Script, execute: Execute) -> None:
        self.script = script
        self._execute = execute

    async def __call__(self, keys: Sequence[str] = (), args: Sequence[Arg] = ()) -> Any:
        return await self.script.run(self._execute, keys, args)
