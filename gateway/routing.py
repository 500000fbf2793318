"""Route matching: longest path prefix wins; methods and host narrow a route. The route
table: routes and upstreams together.

The path matched is the canonical one (paths.py), and it is the path sent upstream.
"""

from __future__ import annotations

from collections.abc import Mapping

from .config import PathSettings, RouteSettings, Settings
from .paths import PathError, climbs_elsewhere, read, strict_refusal
from .upstream import Upstream


class Router:
    def __init__(
        self, routes: tuple[RouteSettings, ...], paths: PathSettings | None = None
    ) -> None:
        self._paths = paths or PathSettings()
        self._fold = self._paths.case_insensitive
        # Stable sort keeps file order among equal prefixes, so the first listed wins.
        ordered = sorted(routes, key=lambda r: len(r.path), reverse=True)
        self._routes = [(r.path.lower() if self._fold else r.path, r) for r in ordered]

    def match(self, path: str, method: str, host: str | None) -> RouteSettings | None:
        """The route for a canonical ``path`` (see :meth:`resolve` for a raw one)."""
        if self._fold:
            path = path.lower()
        hostname = (host or "").rsplit(":", 1)[0].lower() if host else ""
        for prefix, r in self._routes:
            if not path.startswith(prefix):
                continue
            if r.methods is not None and method not in r.methods:
                continue
            if r.host is not None and r.host.lower() != hostname:
                continue
            return r
        return None

    def resolve(
        self, raw_path: str, method: str, host: str | None
    ) -> tuple[str, RouteSettings | None]:
        """The canonical path of ``raw_path`` and its route.

        SECURITY: raises PathError("ambiguous path") when another reading of the raw
        path (decoded, ``\\`` as ``/``, ``;params`` or trailing dots dropped, another
        case) would choose another route, because the backend behind the chosen route
        may read it that way: ``/%2faccount/x`` must not reach the ``/`` route's backend
        as a guest when that backend serves it as ``/account/x``.
        """
        if len(raw_path) > self._paths.max_length:
            raise PathError(f"path longer than {self._paths.max_length} characters", 414)
        path, others = read(raw_path, self._paths.merge_slashes, lower=not self._fold)
        if climbs_elsewhere(raw_path):
            raise PathError("ambiguous path")
        if self._paths.strict:
            why = strict_refusal(path)
            if why is not None:
                raise PathError(why)
        route = self.match(path, method, host)
        for other in others:
            if self.match(other, method, host) is not route:
                raise PathError("ambiguous path")
        if path != raw_path:
            # The backend receives ``path``, not ``raw_path``: its own readings must
            # agree too (removing dot segments can bring pieces together that the raw
            # path's readings saw apart).
            again, others = read(path, self._paths.merge_slashes, lower=not self._fold)
            if again != path:
                raise PathError("ambiguous path")
            for other in others:
                if self.match(other, method, host) is not route:
                    raise PathError("ambiguous path")
        return path, route


class RouteTable:
    """Routes and upstreams, held as one object so that a reload can swap both at once
    (a request reads the table once, at its start, and keeps that one).

    ``reuse``: the upstreams of the table this one replaces; those whose settings are
    unchanged are kept as they are (their warm pools and ejections), the rest are new.
    ``inflight`` counts the requests that began on this table (the proxy keeps it), so
    a reload can tell when the old one is no longer used."""

    def __init__(self, settings: Settings, reuse: Mapping[str, Upstream] | None = None) -> None:
        self.router = Router(settings.routes, settings.paths)
        old = reuse or {}
        self.upstreams = {
            n: old[n] if n in old and old[n].settings == u else Upstream(n, u)
            for n, u in settings.upstreams.items()
        }
        self.inflight = 0

    def close(self, keep: Mapping[str, Upstream] | None = None) -> None:
        """Close the upstreams' idle pooled connections (connections in use close as
        their requests end), except the upstreams in ``keep`` (the next table's)."""
        for name, u in self.upstreams.items():
            if keep is None or keep.get(name) is not u:
                u.close()
