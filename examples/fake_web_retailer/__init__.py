"""The Fake Web Retailer: a small server-rendered web shop.

It runs in two modes (see README.md beside this file):

- ``gateway``: keeps no sessions; reads ``X-Session-*`` request headers from the Session
  Gateway and answers with ``X-Session-Login`` / ``-Logout`` / ``-Cart-*`` instructions.
- ``legacy``: the case study's "before" world, with its own ``sessions`` table that is
  read and written on every request (the benchmark's baseline).
"""

from .app import make_app

__all__ = ["make_app"]
