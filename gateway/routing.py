"""Route matching: longest path prefix wins; methods and host narrow a route."""

from __future__ import annotations

from .config import RouteSettings


class Router:
    def __init__(self, routes: tuple[RouteSettings, ...]) -> None:
        # Stable sort keeps file order among equal prefixes, so the first listed wins.
        self._routes = sorted(routes, key=lambda r: len(r.path), reverse=True)

    def match(self, path: str, method: str, host: str | None) -> RouteSettings | None:
        hostname = (host or "").rsplit(":", 1)[0].lower() if host else ""
        for r in self._routes:
            if not path.startswith(r.path):
                continue
            if r.methods is not None and method not in r.methods:
                continue
            if r.host is not None and r.host.lower() != hostname:
                continue
            return r
        return None
