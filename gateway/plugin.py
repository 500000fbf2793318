"""The plugin chain.

A plugin is one module in ``plugins/`` holding one subclass of :class:`Plugin` (or any
``package.module:Class`` for third-party code). Each hook has a no-op default, so a
plugin implements only the events it cares about; hooks run in the order of the
``plugins:`` list. One instance per app: per-request state goes on ``ctx.state``.

Fault policy: when a hook raises, the error is logged with the plugin's name and counted.
``fault_policy = "open"`` (the default) carries on as if the hook had returned None;
``"closed"`` answers 503 for that request. Either way no unrelated request fails.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from aiohttp import web
from multidict import CIMultiDict
from pydantic import BaseModel, ConfigDict, ValidationError

from . import metrics
from .config import ConfigError, RouteSettings, Settings, _first_error

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .activity import ActivityWriter
    from .sessions import Keys, Session, SessionStore

log = logging.getLogger("gateway.plugin")
T = TypeVar("T")

BUILTIN = {
    "cart": "plugins.cart",
    "viewed_items": "plugins.viewed_items",
    "page_cache": "plugins.page_cache",
    "rate_limit": "plugins.rate_limit",
}


class PluginConfig(BaseModel):
    """Base for a plugin's options: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(slots=True)
class CartInstruction:
    kind: Literal["add", "remove", "clear"]
    params: dict[str, str]


@dataclass(slots=True)
class Services:
    """What the core lends to plugins."""

    settings: Settings
    redis: Redis
    keys: Keys
    store: SessionStore
    activity: ActivityWriter
    redis_timeout: float


@dataclass(slots=True)
class ResponseHead:
    """Status and headers of the response before its body is streamed; response hooks
    may change both. ``headers`` are the ones the client will receive."""

    status: int
    headers: CIMultiDict[str]
    from_upstream: bool


@dataclass(slots=True)
class RequestContext:
    request: web.Request
    route: RouteSettings
    request_id: str
    # The canonical path (paths.py), which chose the route; read it, not request.path
    # or request.raw_path, which hold the path as the client spelled it.
    path: str
    # What goes upstream: the canonical path plus the query exactly as sent ("?..."),
    # or the path alone.
    target: str
    # The client's address as the core decided it (trusted proxies applied; forwarded.py).
    client_address: str = ""
    session: Session | None = None
    # False when the session could not be resolved because Redis did not answer.
    redis_ok: bool = True
    # Extra X-Session-* headers for the backend (e.g. the cart's), added after stripping.
    session_headers: dict[str, str] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    response: ResponseHead | None = None
    # Set when this request's response logged a user in; the previous session, if any.
    logged_in: bool = False
    rotated_from: Session | None = None
    # Set by a response hook to see the upstream body as it is streamed to the client:
    # called with each chunk, then once with None after the last one was sent.
    body_tap: Callable[[bytes | None], None] | None = None
    # Results of plugins' prefetch commands, by plugin name (see Plugin.prefetch).
    prefetched: dict[str, list[Any]] = field(default_factory=dict)


class Plugin:
    """Base class. Override only the hooks you need; all of them default to no-ops."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    fault_policy: ClassVar[Literal["open", "closed"]] = "open"

    def __init__(self, config: Any, services: Services) -> None:
        self.config = config
        self.services = services

    async def startup(self) -> None:
        """Called once before the first request (open connections, load scripts)."""

    async def shutdown(self) -> None:
        """Called once after the last request has finished."""

    def prefetch(self, ctx: RequestContext, key_id: str) -> tuple[tuple[str, ...], ...]:
        """Redis read commands about the session with this key id, sent in the same
        pipeline as the session lookup, so they cost no round trip of their own.

        Their results are in ``ctx.prefetched[self.name]`` when the request hook runs (an
        exception object in place of a command that failed). Absent when no lookup was
        made (no cookie, a new guest, Redis down): the hook then reads for itself or goes
        without. Must be cheap and without side effects: it runs before the session is
        known to exist.
        """
        return ()

    async def request(self, ctx: RequestContext) -> web.StreamResponse | None:
        """Runs after the session is resolved, before the upstream is called.

        Return None to go on. Return a response to answer directly: the upstream and the
        later plugins' request hooks are skipped, the response hooks still run (they see
        ``ctx.response.from_upstream == False``). A response that is already prepared
        (streamed) skips the response hooks too.
        """
        return None

    async def response(self, ctx: RequestContext, head: ResponseHead) -> None:
        """Runs when the status and headers are known, before the body is streamed.
        Change ``head.status`` or ``head.headers`` in place."""

    async def complete(self, ctx: RequestContext) -> None:
        """Runs after the response is finished, in a background task that the client
        never waits for. Exceptions are logged and counted."""

    async def login(self, ctx: RequestContext, old: Session | None, new: Session) -> None:
        """A login replaced ``old`` (or no session) with ``new``: move state keyed by the
        session id (a guest cart, say). Runs before the response is sent; the new session
        already exists, so an exception is logged and the login still succeeds."""

    async def logout(self, ctx: RequestContext, sessions: list[str]) -> None:
        """These session key ids were deleted: by a logout (a logout everywhere calls this
        once per step, up to 100 ids each), or by a login that ended its user's oldest
        sessions beyond ``session.max_per_user``. Runs before the response is sent."""

    async def cart(self, ctx: RequestContext, instructions: list[CartInstruction]) -> None:
        """The backend's X-Session-Cart-* instructions that this route allows, parsed."""


@dataclass(slots=True)
class Chain:
    plugins: list[Plugin]
    # By the plugins a route disables (all a route changes here): its plugins, and
    # those of them that implement prefetch. Worked out once, not on every request.
    _lists: dict[tuple[str, ...], tuple[list[Plugin], list[Plugin]]] = field(
        default_factory=dict
    )

    def _for(self, route: RouteSettings) -> tuple[list[Plugin], list[Plugin]]:
        got = self._lists.get(route.disable_plugins)
        if got is None:
            plugins = [p for p in self.plugins if p.name not in route.disable_plugins]
            prefetch = [p for p in plugins if type(p).prefetch is not Plugin.prefetch]
            got = self._lists[route.disable_plugins] = (plugins, prefetch)
        return got

    def for_route(self, route: RouteSettings) -> list[Plugin]:
        return self._for(route)[0]

    def prefetchers(self, route: RouteSettings) -> list[Plugin]:
        """The route's plugins that read through the session pipeline."""
        return self._for(route)[1]

    async def guarded(
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


def _resolve(name: str) -> type[Plugin]:
    target = BUILTIN.get(name, name)
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


def validate_plugins(settings: Settings) -> list[tuple[type[Plugin], PluginConfig]]:
    """Import every configured plugin and validate its options (for --check and start)."""
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
    known = seen
    for i, r in enumerate(settings.routes):
        for p in r.disable_plugins:
            if p not in known:
                raise ConfigError(f"routes[{i}].disable_plugins: {p!r} is not an enabled plugin")
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
