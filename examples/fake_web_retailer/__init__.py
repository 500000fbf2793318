"""The Fake Web Retailer: a small server-rendered web shop.

It runs in two modes (see README.md beside this file):

- ``gateway``: keeps no sessions; reads ``X-Session-*`` request headers from the Session
  Gateway and answers with ``X-Session-Login`` / ``-Logout`` / ``-Cart-*`` instructions.
- ``legacy``: the case study's "before" world, with its own ``sessions`` table that is
  read and written on every request (the benchmark's baseline).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import make_app

__all__ = ["make_app"]


def __getattr__(name: str) -> Any:
    # Imported on first use, not with the package: ``python -m ...demo`` then reaches
    # its own Ctrl-C handling before aiohttp and friends are loaded.
    if name == "make_app":
        from .app import make_app

        return make_app
    raise AttributeError(name)
