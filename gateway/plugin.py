"""The plugin API: what a plugin is (:class:`Plugin`, :class:`PluginConfig`), what the
core lends it (:class:`Services`) and what it sees of a request (:class:`RequestContext`,
:class:`ResponseHead`). The chain that runs the hooks is chain.py.

A plugin is one module in ``plugins/`` holding one subclass of :class:`Plugin` (or any
``package.module:Class`` for third-party code). Every hook has a pass-through default, so
a plugin implements only the events it cares about; hooks run in the order of the
``plugins:`` list. One instance per process: per-request state goes on ``ctx.state``.

Fault policy: when a hook raises, the error is logged with the plugin's name and counted.
``fault_policy = "open"`` (the default) carries on as if the hook had returned None;
``"closed"`` answers 503 for that request. Either way no unrelated request fails. The
session lifecycle hooks (``session_created``, ``session_rotated``, ``sessions_deleted``)
run outside any request too (an admin revoke): their failures are logged and counted,
and never undo the change they report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from aiohttp import web
from multidict import CIMultiDict
from pydantic import BaseModel, ConfigDict

from .config import RouteSettings, Settings

if TYPE_CHECKING:
    from .redis import Keys, RedisClient
    from .redis.scripts import BoundScript
    from .sessions import Session

Commands = tuple[tuple[str, ...], ...]


class PluginConfig(BaseModel):
    """Base for a plugin's options: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(slots=True)
class Services:
    """What the core lends to plugins."""

    settings: Settings
    redis: RedisClient
    keys: Keys
    redis_timeout: float
    # A Lua script on the same client: EVALSHA with the NOSCRIPT fallback (redis/scripts.py).
    script: Callable[[str], BoundScript]
    # Redis Cluster (redis.cluster): a transaction, script or multi-key command must
    # keep to one slot; a session's keys share one (keys.of), a user's another
    # (keys.of_user). ``redis.delete(*keys)`` splits by slot by itself.
    cluster: bool = False


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
    # Set-Cookie values this request decided on (a new session, an expiry); every
    # answer, whoever makes it, carries them.
    cookies: list[str] = field(default_factory=list)
    # Set when a plugin's bypass_sessions hook left this request's session to the
    # backend: no gateway session, no session cookie, no X-Session-* header either way.
    sessions_bypassed: bool = False
    # The upstream server that answered (scheme://host:port), once one has.
    upstream_server: str = ""


class Plugin:
    """Base class. Override only the hooks you need; all of them default to no-ops."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    fault_policy: ClassVar[Literal["open", "closed"]] = "open"
    # Backend instructions this plugin consumes: an ``instructions:`` entry a route may
    # list, and the X-Session-* response headers it covers, e.g. ``{"cart":
    # ("X-Session-Cart-Add", ...)}``. The core strips them from the response, applies the
    # route's allow-list and hands the values to ``instruction``. Each of them stores
    # something for the session: on a guest route a visitor without a session gets one.
    instructions: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def __init__(self, config: Any, services: Services) -> None:
        self.config = config
        self.services = services

    async def startup(self) -> None:
        """Called once before the first request (open connections, load scripts)."""

    async def shutdown(self) -> None:
        """Called once after the last request has finished."""

    def prefetch(self, ctx: RequestContext, key_id: str) -> Commands:
        """Redis read commands about the session with this key id, sent in the same
        pipeline as the session lookup, so they cost no round trip of their own.

        Their results are in ``ctx.prefetched[self.name]`` when the request hook runs (an
        exception object in place of a command that failed). Absent when no lookup was
        made (no cookie, Redis down): the hook then reads for itself or goes without.
        Must be cheap and without side effects: it runs before the session is known to
        exist.
        """
        return ()

    def bypass_sessions(self, ctx: RequestContext) -> bool:
        """Before the session is resolved, on ``session: optional`` routes: True leaves
        this request's session to the backend, as if the gateway were not there (a
        gradual rollout sends the rest of the visitors through untouched).

        A bypassed request gets no gateway session (none is read, created or adopted),
        no session cookie is set or expired, the backend receives no X-Session-* header
        at all (the client's are stripped as always) and its instructions are dropped
        and counted. The first plugin that answers True decides; ``ctx.sessions_bypassed``
        tells the later hooks. ``session: required`` routes never ask: their backend
        relies on a live session. Runs on every request of the route: no I/O, no await.
        """
        return False

    async def find_session(self, ctx: RequestContext) -> dict[str, str] | None:
        """A session source after the gateway's own (the near-cache, then Redis) found
        none for this request: the fields of a session found elsewhere (a legacy session
        table; ``user_id`` makes it a logged-in one), or None. The core creates the
        gateway session from them (a new token, the cookie set, ``session_created``
        hooks) and the request goes on with it. Sources are asked in the order of
        ``plugins:``; the first found wins. Not called when Redis failed for this
        request."""
        return None

    async def request(self, ctx: RequestContext) -> web.StreamResponse | None:
        """Runs after the session is resolved, before the upstream is called.

        Return None to go on. Return a response to answer directly: the upstream and the
        later plugins' request hooks are skipped, the response hooks still run (they see
        ``ctx.response.from_upstream == False``). A response that is already prepared
        (streamed) skips the response hooks too.
        """
        return None

    async def instruction(self, ctx: RequestContext, values: dict[str, str]) -> None:
        """The backend sent instructions this plugin declared (``instructions``) and the
        route allows: ``values`` maps each header (lower-case) to its value, given once
        (a header given twice is dropped by the core). ``ctx.session`` is the session
        they apply to (a guest created for them, on a guest route); None when there is
        none. Runs before the response hooks."""

    async def response(self, ctx: RequestContext, head: ResponseHead) -> None:
        """Runs when the status and headers are known, before the body is streamed.
        Change ``head.status`` or ``head.headers`` in place."""

    async def complete(self, ctx: RequestContext) -> None:
        """Runs after the response is finished, in a background task that the client
        never waits for. Exceptions are logged and counted."""

    async def session_created(self, session: Session) -> None:
        """A session was created without replacing one (a guest, a session imported by a
        source)."""

    async def session_rotated(self, old: Session | None, new: Session) -> None:
        """A login replaced ``old`` (or no session) with ``new`` (a new token, always):
        move state keyed by the session's key id (a guest cart, say). ``new`` exists
        already and ``old`` is gone: a failure here is logged, the login stands."""

    async def sessions_deleted(self, key_ids: list[str]) -> None:
        """These sessions are gone from Redis (a logout, a logout everywhere step, an
        admin revoke, a user's oldest sessions past ``session.max_per_user``): clean up
        what is kept for them."""

    async def migration_status(self) -> list[tuple[str, str]] | None:
        """Rows (label, value) for ``python -m gateway migrate status``: a session source
        reports how far a migration has come. Called on a plugin built from the config in
        a process of its own, without ``startup``: open what it needs and close it
        again. None: nothing to report."""
        return None
