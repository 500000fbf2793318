"""Signed identity headers: an HMAC over the X-Session-* headers sent upstream.

A backend that can also be reached without the gateway checks the signature and refuses
requests that did not come through it. Standard library only, so a backend can copy this
file (or import it) without aiohttp.

The signed string (UTF-8) is::

    v1\\n<unix seconds>\\n<METHOD>\\n<request target as sent>\\n
    <name>:<value>\\n          one line per X-Session-* header except the signature,
                              name lower-case with "_" read as "-", sorted by name,
                              value exactly as sent

and the header value is ``t=<unix seconds>,v1=<hex HMAC-SHA256>``.

Names are compared lower-case with ``_`` read as ``-`` because that is how frameworks
hand them over (WSGI's ``HTTP_X_SESSION_USER_ID``, Node's lower-case names). A name that
appears twice in that form is refused: a framework might merge or pick either value.

Not covered: the body, the Host and every other header. Anyone who captured a signed
request can send it again, with any body, until ``max_age`` has passed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping

HEADER = "X-Session-Signature"
VERSION = "v1"
_PREFIX = "x-session-"
_VALUE_RE = re.compile(r"t=([0-9]{1,12}),v1=([0-9a-f]{64})")

Headers = Mapping[str, str] | Iterable[tuple[str, str]]


def _canonical(name: str) -> str:
    # The same reading as gateway.headers.normalized (not imported: that module needs
    # multidict, and this one must load in a backend without it).
    return name.lower().replace("_", "-")


def _pairs(headers: Headers) -> list[tuple[str, str]]:
    # A multidict's items() yields every value of a repeated name, so duplicates are seen.
    return list(headers.items() if isinstance(headers, Mapping) else headers)


def signed_string(
    timestamp: int, method: str, target: str, headers: Headers, header: str = HEADER
) -> bytes | None:
    """The bytes that are signed; None when an X-Session-* name occurs twice."""
    skip = _canonical(header)
    lines: dict[str, str] = {}
    for name, value in _pairs(headers):
        n = _canonical(name)
        if not n.startswith(_PREFIX) or n == skip:
            continue
        if n in lines:
            return None
        lines[n] = value
    parts = [f"{VERSION}\n{timestamp}\n{method}\n{target}\n"]
    parts.extend(f"{n}:{lines[n]}\n" for n in sorted(lines))
    # surrogateescape: a byte the HTTP parser could not decode goes back out as itself.
    return "".join(parts).encode("utf-8", "surrogateescape")


def _mac(key: bytes, message: bytes) -> str:
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(
    key: bytes,
    method: str,
    target: str,
    headers: Headers,
    now: float | None = None,
    header: str = HEADER,
) -> str:
    """The value of the signature header for a request with these headers.

    Raises ValueError when an X-Session-* name occurs twice (in any spelling): no
    backend could verify it."""
    t = int(time.time() if now is None else now)
    message = signed_string(t, method, target, headers, header)
    if message is None:
        raise ValueError("an X-Session-* header occurs twice; refusing to sign")
    return f"t={t},{VERSION}={_mac(key, message)}"


def verify(
    key: bytes,
    method: str,
    target: str,
    headers: Headers,
    *,
    max_age: float = 300,
    now: float | None = None,
    header: str = HEADER,
) -> bool:
    """True when ``headers`` carry a valid signature, made at most ``max_age`` seconds
    from ``now``, over exactly these X-Session-* headers, this method and this target
    (the raw request target from the request line, not a decoded path).

    ``headers``: a mapping or (name, value) pairs as received, every X-Session-* header
    included; use :func:`wsgi_headers` for a WSGI environ."""
    pairs = _pairs(headers)
    want = _canonical(header)
    values = [v for n, v in pairs if _canonical(n) == want]
    if len(values) != 1:
        return False
    m = _VALUE_RE.fullmatch(values[0].strip())
    if m is None:
        return False
    t = int(m.group(1))
    if abs((time.time() if now is None else now) - t) > max_age:
        return False
    message = signed_string(t, method, target, pairs, header)
    if message is None:
        return False
    return hmac.compare_digest(_mac(key, message), m.group(2))


def wsgi_headers(environ: Mapping[str, object]) -> list[tuple[str, str]]:
    """The X-Session-* headers of a WSGI request (``HTTP_X_SESSION_USER_ID`` →
    ``x-session-user-id``), for :func:`verify`. The target is
    ``environ["RAW_URI"]`` (gunicorn) or ``environ["REQUEST_URI"]`` (uWSGI, mod_wsgi)."""
    return [
        (k[5:].lower().replace("_", "-"), v)
        for k, v in environ.items()
        if k.startswith("HTTP_X_SESSION_") and isinstance(v, str)
    ]
