"""Requests refused before any routing: smuggling shapes and values the parser may have
let through (defence in depth: aiohttp's C parser refuses most of these itself, its
pure-Python parser fewer)."""

from __future__ import annotations

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
    if len(hosts) > 1 or not all(valid_host(v) for v in hosts):
        return "invalid Host"
    if request.host and not valid_host(request.host):
        return "invalid Host"
    for name, value in h.items():
        if _BAD_VALUE.search(value) or _BAD_VALUE.search(name):
            return "invalid header value"
    return None
