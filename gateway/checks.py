"""Requests refused before any routing: smuggling shapes and values the parser may have
let through (defence in depth: aiohttp's C parser refuses most of these itself, its
pure-Python parser fewer)."""

from __future__ import annotations

import itertools
import re

from aiohttp import web

from .forwarded import valid_host

# Control characters other than HTAB in a header; a lone surrogate is an undecodable
# byte (both aiohttp parsers decode with surrogateescape) that cannot be sent on.
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")


def malformed(request: web.BaseRequest) -> str | None:
    """Why ``request`` must be refused with 400, or None."""
    method = request.method
    if method != method.upper():
        # SECURITY: methods are case-sensitive; "get" would not match a route narrowed
        # by `methods: [GET]` and fall to another route, while a backend that
        # upper-cases methods serves it as GET. (llhttp refuses it already.)
        return "method must be upper case"
    h = request.headers
    cls = h.getall("Content-Length", ())
    tes = h.getall("Transfer-Encoding", ())
    if len(cls) > 1:
        return "duplicate Content-Length"
    if cls and tes:
        return "Content-Length with Transfer-Encoding"
    if tes and [t.strip().lower() for t in ",".join(tes).split(",")] != ["chunked"]:
        return "unsupported Transfer-Encoding"
    if cls and not (cls[0].isascii() and cls[0].isdigit()):
        return "invalid Content-Length"
    hosts = h.getall("Host", ())
    # SECURITY: the host a backend sees (X-Forwarded-Host) meets one rule wherever it came
    # from: the Host header, or an absolute-form target's authority, which aiohttp's
    # pure-Python parser reports as request.host.
    if len(hosts) > 1 or (hosts and not valid_host(hosts[0])):
        return "invalid Host"
    host = request.host
    if host and (not hosts or host != hosts[0]) and not valid_host(host):
        return "invalid Host"
    # One search over every name and value, joined by a tab (a character the pattern
    # allows, so the joined text has a match exactly where one of them has): a search per
    # header cost more than the rest of these checks.
    if _BAD_VALUE.search("\t".join(itertools.chain.from_iterable(h.items()))):
        return "invalid header value"
    return None
