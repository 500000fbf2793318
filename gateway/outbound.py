"""The headers a backend receives: the client's, less everything it must not be able to
send (hop-by-hop, X-Session-* in any spelling, spoofable edge headers, the gateway's
cookie), plus the gateway's own, added last (X-Forwarded-*, X-Request-Id, X-Session-*,
the signature), so nothing the client sent can remove or shadow them."""

from __future__ import annotations

from multidict import CIMultiDict

from .config import Settings
from .forwarded import TrustedProxies, valid_host
from .headers import (
    GATEWAY_REQUEST_HEADERS,
    SPOOFABLE_REQUEST_HEADERS,
    HeaderDrop,
    encode_value,
    header_name_for,
    is_session_header,
    remove_cookie,
    strip_headers,
)
from .plugin import RequestContext
from .signing import sign

# Never from the client, whatever client_headers.keep says: the gateway sets these itself
# (Content-Length from the body it actually sends).
_ALWAYS_DROP = (*GATEWAY_REQUEST_HEADERS, "host", "content-length")


class UpstreamHeaders:
    def __init__(self, settings: Settings, proxies: TrustedProxies) -> None:
        self.proxies = proxies
        self.cookie_name = settings.session.cookie.name
        self.forward_cookie = settings.session.cookie.forward
        ch = settings.client_headers
        self._drop = HeaderDrop(
            (*SPOOFABLE_REQUEST_HEADERS, *ch.drop, *_ALWAYS_DROP),
            keep=[k for k in ch.keep if k not in _ALWAYS_DROP],
        )
        sig = settings.signing
        self._signing = (sig.key.get_secret_value().encode(), sig.header) if sig else None

    def build(self, ctx: RequestContext) -> CIMultiDict[str]:
        request = ctx.request
        headers = strip_headers(request.headers, drop=self._drop)
        # A Cookie header is still here only if the client did not list it in Connection.
        cookies = headers.popall("Cookie", [])
        if cookies:
            kept = (
                "; ".join(cookies)
                if self.forward_cookie
                else remove_cookie(cookies, self.cookie_name)
            )
            if kept:
                headers["Cookie"] = kept
        # Everything below is added after all stripping, so nothing the client sent
        # (not even "Connection: X-Forwarded-For") can remove or shadow it.
        peer = request.remote or ""
        trusted = self.proxies.trusted(peer)
        xff = ", ".join(request.headers.getall("X-Forwarded-For", ())) if trusted else ""
        headers["X-Forwarded-For"] = f"{xff}, {peer}" if xff else peer
        proto = request.headers.get("X-Forwarded-Proto", "") if trusted else ""
        headers["X-Forwarded-Proto"] = proto if proto in ("http", "https") else request.scheme
        host = request.headers.get("X-Forwarded-Host", "") if trusted else ""
        # A trusted proxy's host meets the rule the client's Host met (checks.py).
        headers["X-Forwarded-Host"] = host if host and valid_host(host) else request.host
        headers["X-Request-Id"] = ctx.request_id
        # SECURITY: a bypassed request carries none at all, and the client's were
        # stripped above: the backend tells it from one the gateway vouches for by the
        # missing X-Session-Authenticated, and nothing a client sends can make it look
        # vouched for.
        if ctx.route.session != "none" and not ctx.sessions_bypassed:
            _session_headers(ctx, headers)
        if self._signing is not None:
            # Last, over the headers exactly as they leave (also on session: none routes:
            # the backend learns the request came through the gateway, with no identity).
            key, name = self._signing
            headers.popall(name, None)
            headers.add(name, sign(key, request.method, ctx.target, headers, header=name))
        return headers


def _session_headers(ctx: RequestContext, headers: CIMultiDict[str]) -> None:
    s = ctx.session
    if s is not None:
        only = ctx.route.session_fields
        for name, value in s.fields.items():
            if only is not None and name not in only:
                continue
            header = header_name_for(name)
            if header is None:
                continue
            # add, not set: every X-Session-* spelling was stripped above, and field
            # names are unique, so there is nothing to replace (set scans them all).
            headers.add(header, encode_value(value))
    # Set after the fields: a stored field named id or authenticated (other software's)
    # is replaced by the gateway's own.
    headers["X-Session-Authenticated"] = "true" if s is not None and s.authenticated else "false"
    if s is None:
        return
    headers["X-Session-Id"] = s.id
    for name, value in ctx.session_headers.items():
        if is_session_header(name):
            headers[name] = encode_value(value)
