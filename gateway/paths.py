"""One reading of the request path (DESIGN.md: the path that chooses the route is the path
the backend receives).

:func:`canonical` is the gateway's reading of a raw path: visible ASCII only, percent
escapes of unreserved characters decoded and all others upper-cased, repeated slashes
merged, dot segments removed. That form picks the route and goes upstream.

Backends read paths in other ways: IIS decodes twice and takes ``\\`` for ``/``,
Tomcat, Jetty and Spring drop ``;params`` from segments, Windows drops trailing dots
and spaces, many frameworks decode ``%2F``, some match without regard to case.
:func:`readings` lists what the same raw path becomes under those readings; the router
refuses a path when one of them would choose another route (``/%2faccount/x`` is
``/account/x`` to a decoding backend behind the ``/`` route). Envoy's ``normalize_path``,
``merge_slashes`` and ``path_with_escaped_slashes_action`` are the model.

Pure functions on ``str``: a raw path is the request target before ``?`` as aiohttp hands
it over (ASCII from the C parser, which refuses other bytes; the pure-Python parser
passes bytes >= 0x80 as lone surrogates, which are refused here).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from string import ascii_letters, ascii_lowercase, ascii_uppercase, digits
from urllib.parse import quote, unquote_to_bytes

__all__ = ["PathError", "canonical", "readings", "route_path", "split_target", "strict_refusal"]

UNRESERVED = frozenset(ascii_letters + digits + "-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# Paths that no reading changes except lower-casing: no escapes, backslashes, ;params,
# repeated slashes or segments ending in a dot (which also catches "." and "..").
_PLAIN = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
_VISIBLE = re.compile(r"[!-~]*")
_SLASHES = re.compile(r"//+")
# A segment ending in a dot or a space (raw spaces are refused, so only %20 remains).
_DOT_OR_SPACE_END = re.compile(r"(\.|%20)(?=/|$)")
# The same in a reading, before backslashes and ;params have made the segments.
_TRAILING = re.compile(r"[. ](?=[/;\\]|$)")
# Case-insensitive servers fold ASCII letters only: a decoded reading holds one
# character per byte, and str.lower() would turn byte 0xC3 into 0xE3.
_ASCII_LOWER = str.maketrans(ascii_uppercase, ascii_lowercase)
_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*")


class PathError(ValueError):
    """A path the gateway refuses; the message is the short reason for the 400."""


def split_target(raw_target: str) -> tuple[str, str]:
    """The raw path and the query (``?...`` exactly as sent, or ``""``) of a request
    target.

    SECURITY: an absolute-form target (``http://host/x``) is reduced to its path, so it
    can never choose the host the gateway connects to; ``*`` and anything else that is
    not a path is refused. The query is not normalised, but must be visible ASCII like
    the path: a backend must not read something else than was checked.
    """
    if not raw_target.startswith("/"):
        m = _ABSOLUTE_FORM.match(raw_target)
        if m is None:
            raise PathError("request target must be a path")
        raw_target = raw_target[m.end() :]
        if not raw_target.startswith("/"):
            raw_target = "/" + raw_target
    path, sep, query = raw_target.partition("?")
    if sep and (not _VISIBLE.fullmatch(query) or "#" in query):
        raise PathError("query must be visible ASCII without #")
    return path, sep + query


def canonical(raw_path: str, merge_slashes: bool) -> str:
    """The gateway's one reading of ``raw_path`` (raises PathError when it has none)."""
    if _is_plain(raw_path):
        return raw_path
    if not raw_path.startswith("/"):
        raise PathError("path must start with /")
    if not _VISIBLE.fullmatch(raw_path):
        raise PathError("path must be visible ASCII")
    if "#" in raw_path:
        raise PathError("# in path")
    return _structure(_escapes(raw_path, lenient=False), merge_slashes)


def readings(raw_path: str, merge_slashes: bool, *, lower: bool = True) -> list[str]:
    """Other readings of ``raw_path`` a backend may make, each canonicalised, without
    the canonical one and without repeats (raises PathError like :func:`canonical`).

    Read as: decoded once and twice, ``\\`` as ``/``, ``;params`` dropped from every
    segment, trailing dots and spaces dropped from every segment, lower-cased
    (``lower=False`` leaves that out), and every combination of these; each with
    repeated slashes merged, whatever ``merge_slashes`` says, because the backend may
    merge them. A decoded reading can hold bytes a raw path may not (controls, ``%zz``,
    non-ASCII): they are kept encoded rather than the reading dropped, or
    ``/%2Faccount/x%2500`` would escape the check.
    """
    if _is_plain(raw_path):
        # The common case: nothing but the case can read differently.
        low = raw_path.lower() if lower else raw_path
        return [low] if low != raw_path else []
    return _all_readings(raw_path, merge_slashes, lower)


def strict_refusal(path: str) -> str | None:
    """Why ``paths.strict`` refuses a canonical path, or None: the spellings servers
    disagree on, refused even where no reading leads to another route."""
    if "%2F" in path or "%5C" in path or "\\" in path:
        return "encoded slash or backslash in path"
    if ";" in path or "%3B" in path:
        return "; in path"
    if _DOT_OR_SPACE_END.search(path):
        return "path segment ending in a dot or space"
    return None


def route_path(path: str) -> str:
    """A route's configured ``path`` in canonical form (ValueError when it is not one):
    non-ASCII is percent-encoded as UTF-8 and escapes are normalised; dot segments,
    repeated slashes and bad escapes are errors, not silently read another way."""
    if not path.startswith("/"):
        raise ValueError("must start with /")
    encoded = "".join(c if c.isascii() else quote(c, safe="") for c in path)
    if not _VISIBLE.fullmatch(encoded) or "#" in encoded or "?" in encoded:
        raise ValueError("must be a path of visible characters, without # or ?")
    try:
        normal = _escapes(encoded, lenient=False)
    except PathError as e:
        raise ValueError(str(e)) from None
    if _structure(normal, merge_slashes=True) != normal:
        raise ValueError("must be a normalised path (no . or .. segments, no //)")
    return normal


# -- internals ---------------------------------------------------------------------------


def _is_plain(path: str) -> bool:
    return (
        _PLAIN.fullmatch(path) is not None
        and "//" not in path
        and "./" not in path
        and not path.endswith(".")
    )


def _all_readings(raw_path: str, merge_slashes: bool, lower: bool) -> list[str]:
    """:func:`readings` without its shortcut for plain paths."""
    canon = canonical(raw_path, merge_slashes)
    seen = {canon}
    out: list[str] = []
    for base in _decodings(raw_path):
        for variant in _variants(base, lower):
            r = _structure(_escapes(_visible(variant), lenient=True), merge_slashes=True)
            if r not in seen:
                seen.add(r)
                out.append(r)
    return out


def _escapes(path: str, *, lenient: bool) -> str:
    """Percent escapes normalised: unreserved characters decoded, the rest upper-cased.
    Strict: a malformed escape or an encoded control byte is a PathError. Lenient (for
    readings): a stray ``%`` becomes ``%25`` and control bytes stay encoded."""
    if "%" not in path:
        return path
    parts = path.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        h = part[:2]
        if len(h) < 2 or not (h[0] in _HEX and h[1] in _HEX):
            if not lenient:
                raise PathError("malformed percent escape in path")
            out.append("%25" + part)
            continue
        v = int(h, 16)
        if v < 0x20 or v == 0x7F:
            if not lenient:
                raise PathError("encoded control character in path")
        elif chr(v) in UNRESERVED:
            out.append(chr(v) + part[2:])
            continue
        out.append("%" + h.upper() + part[2:])
    return "".join(out)


def _structure(path: str, merge_slashes: bool) -> str:
    """Repeated slashes merged (if asked), then dot segments removed (RFC 3986
    section 5.2.4); climbing above the root stays at ``/``."""
    if merge_slashes and "//" in path:
        path = _SLASHES.sub("/", path)
    if "/." not in path:
        return path
    segments = path.split("/")
    out: list[str] = []
    for seg in segments[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    if segments[-1] in (".", ".."):
        out.append("")
    return "/" + "/".join(out)


def _decodings(raw_path: str) -> Iterator[str]:
    """The raw path, then decoded once and twice (IIS), as long as each changes it. One
    character per byte (latin-1), so no byte is lost before :func:`_visible`."""
    yield raw_path
    path = raw_path
    for _ in range(2):
        if "%" not in path:
            return
        decoded = unquote_to_bytes(path).decode("latin-1")
        if decoded == path:
            return
        yield decoded
        path = decoded


def _backslash(path: str) -> str:
    return path.replace("\\", "/")


def _no_params(path: str) -> str:
    return "/".join(seg.split(";", 1)[0] for seg in path.split("/"))


def _no_trailing_dots(path: str) -> str:
    return "/".join(seg if seg in (".", "..") else seg.rstrip(". ") for seg in path.split("/"))


def _lower(path: str) -> str:
    return path.translate(_ASCII_LOWER)


def _variants(path: str, lower: bool) -> Iterator[str]:
    """``path`` under every combination of the transforms that can change it, applied
    in one order (backslashes first: they make segments)."""
    steps: list[Callable[[str], str]] = []
    if "\\" in path:
        steps.append(_backslash)
    if ";" in path:
        steps.append(_no_params)
    if _TRAILING.search(path):
        steps.append(_no_trailing_dots)
    if lower and path != _lower(path):
        steps.append(_lower)
    for n in range(len(steps) + 1):
        for combo in itertools.combinations(steps, n):
            v = path
            for step in combo:
                v = step(v)
            yield v


def _visible(path: str) -> str:
    """A decoded reading made visible ASCII again: every other byte, ``#`` and ``?``
    percent-encoded (they are data in a decoded path)."""
    if not _VISIBLE.fullmatch(path) or "#" in path or "?" in path:
        path = "".join(c if "!" <= c <= "~" and c not in "#?" else f"%{ord(c):02X}" for c in path)
    return path
