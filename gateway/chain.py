"""The plugin chain: loads the configured plugins and runs their hooks.

Dispatch and fault policy live here, once (mitmproxy's ``AddonManager.trigger_event``
is the model): the proxy and the session actions ask the chain to run an event, never
loop over plugins themselves. Per route, the chain runs the plugins the route does not
switch off; the session lifecycle events run on every plugin (they may come without a
request, and a plugin's state must follow its sessions whatever route changed them).

The registry of built-in plugins is ``plugins.BUILTIN`` (``plugins/__init__.py``); the
core names no plugin.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from pydantic import ValidationError

from . import metrics
from .config import ConfigError, RouteSettings, Settings, _first_error
from .headers import normalized
from .instructions import CORE_INSTRUCTIONS, Table
from .plugin import Commands, Plugin, PluginConfig, RequestContext, ResponseHead, Services

if TYPE_CHECKING:
    from .sessions import Session

log = logging.getLogger("gateway.plugin")
T = TypeVar("T")


def registry() -> Mapping[str, str]:
    """Built-in plugin names → ``module`` or ``module:Class``, from the plugins package."""
    try:
        mod = importlib.import_module("plugins")
    except ImportError:
        return {}
    return dict(getattr(mod, "BUILTIN", {}))


class _RouteChain:
    """The plugins one route runs, and those of them with a prefetch, a session source
    or a say in bypassing sessions: worked out once per route, not on every request."""

    __slots__ = ("bypassers", "plugins", "prefetchers", "sources")

    def __init__(self, plugins: list[Plugin]) -> None:
        self.plugins = plugins
        self.bypassers = [
            p for p in plugins if type(p).bypass_sessions is not Plugin.bypass_sessions
        ]
        self.prefetchers = [p for p in plugins if type(p).prefetch is not Plugin.prefetch]
        self.sources = [p for p in plugins if type(p).find_session is not Plugin.find_session]


class Chain:
    def __init__(self, plugins: list[Plugin]) -> None:
        self.plugins = plugins
        self._routes: dict[tuple[str, ...], _RouteChain] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Which instruction headers the core and these plugins consume.
        self.instructions = Table(plugins, known=_builtin_instructions())

    def route(self, route: RouteSettings) -> _RouteChain:
        got = self._routes.get(route.disable_plugins)
        if got is None:
            got = self._routes[route.disable_plugins] = _RouteChain(
                [p for p in self.plugins if p.name not in route.disable_plugins]
            )
        return got

    async def _run(
        self, plugin: Plugin, hook: Callable[..., Awaitable[T]], *args: Any
    ) -> tuple[bool, T | None]:
        """Run one hook; (ok, result). ok is False when it raised and the plugin's policy
        is closed."""
        try:
            return True, await hook(*args)
        except Exception:
            metrics.PLUGIN_ERRORS.labels(plugin.name).inc()
            log.exception("plugin %s: %s hook raised", plugin.name, hook.__name__)
            return plugin.fault_policy == "open", None

    # -- lifecycle ------------------------------------------------------------------------

    async def startup(self) -> list[Plugin]:
        """Start every plugin in order; the ones started, for ``shutdown`` (a failure
        stops the start and is raised)."""
        started: list[Plugin] = []
        try:
            for p in self.plugins:
                await p.startup()
                started.append(p)
        except BaseException:
            await self.shutdown(started)
            raise
        return started

    async def shutdown(self, started: list[Plugin] | None = None) -> None:
        for p in reversed(self.plugins if started is None else started):
            try:
                await p.shutdown()
            except Exception:
                log.exception("plugin %s: shutdown failed", p.name)

    async def drain(self, seconds: float) -> None:
        """Wait (at most ``seconds``) for the ``complete`` hooks still running."""
        if self._background:
            await asyncio.wait(self._background, timeout=seconds)

    # -- one request ----------------------------------------------------------------------

    def prefetch(self, ctx: RequestContext, key_id: str) -> tuple[Commands, list[tuple[str, int]]]:
        """The route's plugins' prefetch commands, and (name, count) spans to hand each
        its results with ``take_prefetched``."""
        commands: list[tuple[str, ...]] = []
        spans: list[tuple[str, int]] = []
        for p in self.route(ctx.route).prefetchers:
            mine = p.prefetch(ctx, key_id)
            spans.append((p.name, len(mine)))
            commands.extend(mine)
        return tuple(commands), spans

    @staticmethod
    def take_prefetched(
        ctx: RequestContext, spans: list[tuple[str, int]], results: list[Any]
    ) -> None:
        i = 0
        for name, n in spans:
            ctx.prefetched[name] = results[i : i + n]
            i += n

    def bypass_sessions(self, ctx: RequestContext) -> tuple[bool, bool]:
        """(ok, bypass): whether a plugin leaves this request's session to the backend.
        ok is False when a hook raised and its plugin's policy is closed."""
        for p in self.route(ctx.route).bypassers:
            try:
                if p.bypass_sessions(ctx):
                    return True, True
            except Exception:
                metrics.PLUGIN_ERRORS.labels(p.name).inc()
                log.exception("plugin %s: bypass_sessions hook raised", p.name)
                if p.fault_policy == "closed":
                    return False, False
        return True, False

    async def find_session(self, ctx: RequestContext) -> dict[str, str] | None:
        for p in self.route(ctx.route).sources:
            # A failing source (whatever its policy) has no session to give.
            _, found = await self._run(p, p.find_session, ctx)
            if found is not None:
                return found
        return None

    async def request(self, ctx: RequestContext) -> tuple[bool, web.StreamResponse | None]:
        """The request hooks in order until one answers; (False, None) when one failed
        closed."""
        for p in self.route(ctx.route).plugins:
            ok, answer = await self._run(p, p.request, ctx)
            if not ok:
                return False, None
            if answer is not None:
                return True, answer
        return True, None

    async def instruction(self, ctx: RequestContext, values: dict[str, str]) -> None:
        """Hand each plugin the instruction headers it owns (a failure is its own)."""
        by_plugin: dict[Plugin, dict[str, str]] = {}
        for header, value in values.items():
            owner = self.instructions.owner.get(header)
            if owner is not None:
                by_plugin.setdefault(owner, {})[header] = value
        for p in self.route(ctx.route).plugins:
            mine = by_plugin.get(p)
            if mine:
                await self._run(p, p.instruction, ctx, mine)

    async def response(self, ctx: RequestContext, head: ResponseHead) -> bool:
        """Every response hook on ``head``; False when one failed closed."""
        ctx.response = head
        for p in self.route(ctx.route).plugins:
            ok, _ = await self._run(p, p.response, ctx, head)
            if not ok:
                return False
        return True

    def complete(self, ctx: RequestContext) -> None:
        """The complete hooks, in background tasks the client never waits for."""
        for p in self.route(ctx.route).plugins:
            if type(p).complete is Plugin.complete:
                continue
            task = asyncio.create_task(self._run(p, p.complete, ctx), name=f"complete-{p.name}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # -- sessions, with or without a request ------------------------------------------------

    async def session_created(self, session: Session) -> None:
        for p in self.plugins:
            await self._run(p, p.session_created, session)

    async def session_rotated(self, old: Session | None, new: Session) -> None:
        for p in self.plugins:
            await self._run(p, p.session_rotated, old, new)

    async def sessions_deleted(self, key_ids: list[str]) -> None:
        if key_ids:
            for p in self.plugins:
                await self._run(p, p.sessions_deleted, key_ids)


def _resolve(name: str) -> type[Plugin]:
    target = registry().get(name, name)
    mod_name, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"plugins.{name}: cannot import {mod_name!r} ({e})") from None
    if attr:
        cls = getattr(mod, attr, None)
    else:
        found = [
            v
            for v in vars(mod).values()
            if isinstance(v, type)
            and issubclass(v, Plugin)
            and v is not Plugin
            and v.__module__ == mod.__name__
        ]
        cls = found[0] if len(found) == 1 else None
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise ConfigError(f"plugins.{name}: {target!r} does not name one Plugin subclass")
    return cls


def _builtin_instructions() -> dict[str, tuple[str, ...]]:
    """The instructions the built-in plugins declare, whether enabled or not."""
    out: dict[str, tuple[str, ...]] = {}
    for name in registry():
        try:
            out.update(_resolve(name).instructions)
        except ConfigError:
            continue
    return out


def _known_instructions(enabled: list[type[Plugin]]) -> set[str]:
    """Instructions a route may list: the core's, the enabled plugins', and the built-in
    plugins' (a route may name one whose plugin is off: its headers are then dropped and
    counted as having no plugin). An enabled plugin may not claim a header already
    claimed (by the core or another plugin)."""
    claimed = {h for hs in CORE_INSTRUCTIONS.values() for h in hs}
    for cls in enabled:
        for headers in cls.instructions.values():
            for h in headers:
                if normalized(h) in claimed:
                    raise ConfigError(
                        f"plugins.{cls.__name__}: instruction header {h} is already claimed"
                    )
                claimed.add(normalized(h))
    known = set(CORE_INSTRUCTIONS)
    for cls in enabled:
        known.update(cls.instructions)
    known.update(_builtin_instructions())
    return known


def validate_plugins(settings: Settings) -> list[tuple[type[Plugin], PluginConfig]]:
    """Import every configured plugin and validate its options and what routes name of
    plugins (for --check and start)."""
    out: list[tuple[type[Plugin], PluginConfig]] = []
    seen: set[str] = set()
    for i, (name, opts) in enumerate(settings.plugin_entries()):
        if name in seen:
            raise ConfigError(f"plugins[{i}]: {name} is listed twice")
        seen.add(name)
        cls = _resolve(name)
        try:
            cfg = cls.Config.model_validate(opts)
        except ValidationError as e:
            raise ConfigError(f"plugins[{i}].{name}.{_first_error(e)}") from None
        out.append((cls, cfg))
    known = _known_instructions([cls for cls, _ in out])
    for i, r in enumerate(settings.routes):
        for p in r.disable_plugins:
            if p not in seen:
                raise ConfigError(f"routes[{i}].disable_plugins: {p!r} is not an enabled plugin")
        for ins in r.instructions:
            if ins not in known:
                raise ConfigError(
                    f"routes[{i}].instructions: must be one of {', '.join(sorted(known))}"
                )
    return out


def build_chain(settings: Settings, services: Services) -> Chain:
    plugins: list[Plugin] = []
    for (cls, cfg), (name, _) in zip(
        validate_plugins(settings), settings.plugin_entries(), strict=True
    ):
        p = cls(cfg, services)
        p.name = name  # type: ignore[misc]
        plugins.append(p)
    return Chain(plugins)
