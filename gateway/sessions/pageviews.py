"""What a request does to its session's activity (``activity.*`` in config.yaml): a page
view (last_activity, current_page, page_views and the idle TTL), a touch (last_activity
and the idle TTL only), or nothing.

By default a page view is a GET or HEAD answered 2xx or 3xx, on a path that is neither a
static file (by its extension) nor listed in ``ignore_paths`` (``/favicon.ico``): what a
person asked to see. The browser's own requests for icons and assets, 404s and errors
are not activity at all, so they never become ``current_page`` nor keep a forgotten tab's
session alive. A request with another method answered the same way (a form posted, an
API call) and an opened WebSocket are a touch: the person is there, but saw no page.
Requests of ``session: none`` routes have no session, so they are never counted.
"""

from __future__ import annotations

from typing import Literal

from ..config import ActivitySettings

Kind = Literal["view", "touch"]


class PageViews:
    def __init__(self, settings: ActivitySettings) -> None:
        self.methods = frozenset(m.upper() for m in settings.count_methods)
        self.classes = frozenset(s[0] for s in settings.count_statuses if s.endswith("xx"))
        self.codes = frozenset(int(s) for s in settings.count_statuses if s.isdigit())
        self.exact = frozenset(p for p in settings.ignore_paths if not p.endswith("/"))
        self.prefixes = tuple(p for p in settings.ignore_paths if p.endswith("/"))
        self.extensions = tuple(e.lower() for e in settings.static_extensions)

    def ignored(self, path: str) -> bool:
        """A path whose requests are never activity: listed, or a static file."""
        if path in self.exact or path.startswith(self.prefixes):
            return True
        last = path.rpartition("/")[2].lower()
        return bool(self.extensions) and last.endswith(self.extensions)

    def counted(self, status: int) -> bool:
        return status in self.codes or str(status)[0] in self.classes

    def classify(self, method: str, path: str, status: int) -> Kind | None:
        """``path``: the canonical path (the one that chose the route)."""
        if self.ignored(path):
            return None
        if status == 101:  # a WebSocket opened
            return "touch"
        if not self.counted(status):
            return None
        return "view" if method in self.methods else "touch"
