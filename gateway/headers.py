"""Header rules: what may cross the gateway in each direction, and how values are encoded.

The gateway's own headers are trusted by the backend, so every spelling a client could
use to forge one is removed before they are added (step 3 and 6 of the request path).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote

from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 §7.6.1 plus the de-facto ones (Keep-Alive, Proxy-Connection). Plain lower-case
# strings: multidict's istr hashes case-sensitively, so a set of istr only matches the
# exact spelling (and the pure-Python parser keeps the client's spelling).
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
SESSION_PREFIX = "x-session-"
# Headers the gateway itself sets towards the backend: a client-sent copy is replaced.
GATEWAY_REQUEST_HEADERS = frozenset(
    h.lower() for h in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Request-Id")
)
# Request headers that frameworks, apps and auth middleware trust as set by a proxy, a
# CDN or an identity layer in front of them: the client's address, scheme or host, a path
# or method that overrides the request line, a signed-in user, a TLS client certificate.
# From a client each one is a forgery, so every spelling is dropped before the request
# goes upstream ("client_headers.keep" lets a family through where a trusted edge sets
# it; "client_headers.drop" adds more). Lower-case, "_" read as "-"; a trailing "*" is a
# family. The gateway's own X-Forwarded-For/-Proto/-Host are added after the drop.
SPOOFABLE_REQUEST_HEADERS = (
    # client address, scheme, host (Spring and Werkzeug prefer Forwarded to X-Forwarded-*)
    "forwarded",
    "x-forwarded-*",
    "x-real-ip",
    "x-client-ip",
    "client-ip",
    "x-cluster-client-ip",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "x-proxyuser-ip",
    "true-client-ip",
    "cf-connecting-*",
    "fastly-client-ip",
    "x-host",
    "x-original-host",
    "x-url-scheme",
    "x-scheme",
    "front-end-https",
    # a path or method that overrides the request line (Symfony, IIS, Rails, Laravel)
    "x-original-url",
    "x-original-uri",
    "x-original-method",
    "x-rewrite-url",
    "x-override-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-envoy-*",
    # identity set by an auth proxy (oauth2-proxy, Kong, Azure, IAP, ALB, Pomerium,
    # Cloudflare Access, Grafana's auth proxy, Apache and IIS)
    "remote-user",
    "x-remote-user",
    "x-user",
    "x-email",
    "x-auth-request-*",
    "x-authenticated-*",
    "x-consumer-*",
    "x-credential-*",
    "x-userinfo",
    "x-id-token",
    "x-jwt-assertion*",
    "x-ms-client-principal*",
    "x-ms-token-*",
    "x-goog-authenticated-*",
    "x-goog-iap-*",
    "x-amzn-oidc-*",
    "x-pomerium-*",
    "cf-access-*",
    "x-webauth-*",
    # TLS client certificates as a terminating proxy passes them on
    "x-client-cert*",
    "x-client-verify",
    "x-client-dn",
    "x-ssl-*",
    "ssl-client-*",
    "x-arr-clientcert",
)


class HeaderDrop:
    """Names and ``family-*`` patterns to drop, less those to keep (a kept name or family
    wins over a dropped family: keep ``cf-connecting-ip``, still drop the rest of
    ``cf-connecting-*``). ``matches`` takes a name already normalised (lower-case, "_"
    read as "-")."""

    __slots__ = ("keep_names", "keep_prefixes", "names", "prefixes", "verdicts")

    def __init__(self, patterns: Iterable[str], keep: Iterable[str] = ()) -> None:
        kept = set(keep)
        pats = [p for p in patterns if p not in kept]
        self.names = frozenset(p for p in pats if not p.endswith("*"))
        self.prefixes = tuple(p[:-1] for p in pats if p.endswith("*"))
        self.keep_names = frozenset(k for k in kept if not k.endswith("*"))
        self.keep_prefixes = tuple(k[:-1] for k in kept if k.endswith("*"))
        # strip_headers' memo for this rule (it goes with the rule on a reload).
        self.verdicts: dict[str, str | None] = {}

    def matches(self, norm: str) -> bool:
        if norm in self.names:
            return True
        if not self.prefixes or not norm.startswith(self.prefixes):
            return False
        return norm not in self.keep_names and not (
            self.keep_prefixes and norm.startswith(self.keep_prefixes)
        )


_PLAIN_VALUE = re.compile(r"[\x21-\x24\x26-\x7e]*")  # visible ASCII except %
_VISIBLE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")
FIELD_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_UNDECODED = re.compile(r"[\ud800-\udfff]")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{8,128}")


def normalized(name: str) -> str:
    """The name as a header-name comparison sees it: lower-case, ``_`` read as ``-``.

    Some servers (CGI, WSGI, nginx with underscores_in_headers) turn ``X_Session_User_Id``
    into the same variable as ``X-Session-User-Id``, so both spellings are one header here.
    """
    return name.lower().replace("_", "-")


def is_session_header(name: str) -> bool:
    return normalized(name).startswith(SESSION_PREFIX)


def connection_tokens(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> set[str]:
    tokens: set[str] = set()
    getall = getattr(headers, "getall", None)
    values: Iterable[str] = getall("Connection", ()) if getall else [headers.get("Connection", "")]
    for value in values:
        for tok in value.split(","):
            tok = tok.strip()
            if tok:
                tokens.add(normalized(tok))
    return tokens


# Verdicts of strip_headers on names it has seen (HeaderDrop.verdicts; this one without a
# drop rule): the normalized name when the fixed rules let it through, None when they
# drop it. Every request repeats the same few names, and normalizing and matching each
# again was ~1 % of a proxied request's CPU. The names come from clients and backends, so
# a memo stops growing at _VERDICTS_MAX (a name not in it is judged afresh, as before).
_VERDICTS_MAX = 1024
_verdicts: dict[str, str | None] = {}


def _verdict(memo: dict[str, str | None], name: str, drop: HeaderDrop | None) -> str | None:
    # Compared with "_" read as "-": CGI-style backends turn X_Real_IP and X-Real-IP into
    # the same variable.
    norm = normalized(name)
    out: str | None = norm
    if norm in HOP_BY_HOP or norm.startswith(SESSION_PREFIX):
        out = None
    elif drop is not None and drop.matches(norm):
        out = None
    if len(memo) < _VERDICTS_MAX:
        memo[name] = out
    return out


_session_names: dict[str, str | None] = {}


def session_header_name(name: str) -> str | None:
    """The normalized name when ``name`` is an X-Session-* spelling, else None;
    remembered like strip_headers' verdicts (instructions.collect asks it for every
    backend response header)."""
    if name in _session_names:
        return _session_names[name]
    norm = normalized(name)
    out = norm if norm.startswith(SESSION_PREFIX) else None
    if len(_session_names) < _VERDICTS_MAX:
        _session_names[name] = out
    return out


def strip_headers(
    headers: CIMultiDictProxy[str] | CIMultiDict[str],
    *,
    drop: HeaderDrop | None = None,
) -> CIMultiDict[str]:
    """A copy without hop-by-hop headers, names listed in Connection, any X-Session-*
    spelling, and what ``drop`` matches."""
    listed = connection_tokens(headers) if "Connection" in headers else None
    memo = _verdicts if drop is None else drop.verdicts
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        norm = memo[name] if name in memo else _verdict(memo, name, drop)
        if norm is None or (listed and norm in listed):
            continue
        out.add(name, value)
    return out


@functools.lru_cache(maxsize=4096)
def header_name_for(field: str) -> str | None:
    """``user_id`` → ``X-Session-User-Id``; None for a name that has no safe header (a
    field written by other software). Memoised: the same few names, every request."""
    if not FIELD_NAME_RE.fullmatch(field):
        return None
    return "X-Session-" + "-".join(p.capitalize() for p in field.split("_"))


def encode_value(value: str) -> str:
    """Percent-encode anything outside visible ASCII, and ``%`` itself, so a stored value
    can never split or add a header and a backend may always percent-decode."""
    if _PLAIN_VALUE.fullmatch(value):
        return value
    # surrogateescape: a value read from Redis that is not UTF-8 (other software wrote
    # it; the client decodes it so) goes out as its original bytes, percent-encoded.
    return quote(value, safe=_VISIBLE, errors="surrogateescape")


def parse_params(value: str) -> dict[str, str] | None:
    """``a=1; b=x%40y`` → ``{"a": "1", "b": "x@y"}``; None when malformed.

    A key given twice is malformed: silently taking one of them would let a confused or
    compromised backend smuggle a second user_id past a reviewer reading logs.
    """
    out: dict[str, str] = {}
    for part in value.split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, val = part.partition("=")
        key = key.strip().lower()
        if not sep or not FIELD_NAME_RE.fullmatch(key) or key in out:
            return None
        try:
            decoded = unquote(val.strip(), errors="strict")
        except UnicodeDecodeError:
            return None
        # A raw byte the backend sent unencoded (aiohttp hands it over as a lone
        # surrogate) is not UTF-8 text and cannot be stored as such: malformed. Encoded
        # bytes (%0A, %C3%A9) are data and kept.
        if _UNDECODED.search(decoded):
            return None
        out[key] = decoded
    return out


def parse_cookie_values(cookie_headers: Iterable[str], name: str) -> list[str]:
    """Every value the client sent for cookie ``name`` (several means: no session)."""
    found: list[str] = []
    for header in cookie_headers:
        for pair in header.split(";"):
            k, sep, v = pair.strip().partition("=")
            if sep and k.strip() == name:
                found.append(v.strip().strip('"'))
    return found


def remove_cookie(cookie_headers: Iterable[str], name: str) -> str | None:
    """The Cookie header without cookie ``name``; None when nothing is left."""
    kept: list[str] = []
    for header in cookie_headers:
        for pair in header.split(";"):
            pair = pair.strip()
            if not pair:
                continue
            k, _, _ = pair.partition("=")
            if k.strip() != name:
                kept.append(pair)
    return "; ".join(kept) or None


def set_cookie_name(value: str) -> str:
    return value.split("=", 1)[0].strip()
