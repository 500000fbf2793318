"""Who the client is and which host it asked for: the one answer for the core and the
plugins (uvicorn's ``_TrustedHosts`` is the model).

Only a peer listed in ``trusted_proxies`` may say, through ``X-Forwarded-*``, that it
speaks for someone else; from anyone else those headers are ignored (and replaced
towards the backend, see proxy.py).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable

from aiohttp import web

# RFC 3986 host (a registered name or a bracketed IP literal) with an optional port.
# Narrower than the RFC's reg-name on purpose: no percent-encoding, quotes or other
# sub-delims, which no real host name needs and a backend may mis-read or reflect.
HOST_RE = re.compile(
    r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?)"
    r"(?::[0-9]{1,5})?"
)


def valid_host(value: str) -> bool:
    """Whether ``value`` may be used as a host, wherever it came from (a Host header, an
    absolute-form request target, a trusted proxy's X-Forwarded-Host)."""
    return HOST_RE.fullmatch(value) is not None


def bucket(address: str) -> str:
    """The unit a per-address limit counts: the address itself, or for IPv6 its /64,
    which one client typically owns whole (else one client would have 2^64 budgets)."""
    if ":" not in address:
        # IPv4 (or no address): the address as the peer gave it, dotted quad, is its
        # own bucket. Parsing it on every request cost more than the rest of this.
        return address
    return _bucket6(address)


@functools.lru_cache(maxsize=4096)
def _bucket6(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class TrustedProxies:
    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def trusted(self, address: str | None) -> bool:
        if not address or not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in n for n in self.networks)

    def client_address(self, request: web.BaseRequest) -> str:
        """The client's address: the peer, or behind trusted proxies the rightmost
        X-Forwarded-For entry not added by one of them."""
        peer = request.remote or ""
        if not self.trusted(peer):
            return peer
        hops = [
            h.strip()
            for v in request.headers.getall("X-Forwarded-For", ())
            for h in v.split(",")
            if h.strip()
        ]
        while hops and self.trusted(peer):
            peer = hops.pop()
        return peer
