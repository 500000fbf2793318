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

import functools
import re
from collections.abc import Callable, Iterable, Iterator
from string import ascii_letters, digits
from urllib.parse import quote, unquote, unquote_to_bytes

__all__ = [
    "PathError",
    "canonical",
    "climbs_elsewhere",
    "read",
    "readings",
    "route_path",
    "split_target",
    "strict_refusal",
]

UNRESERVED = frozenset(ascii_letters + digits + "-._~")
# Readings of paths up to this long are remembered, this many (at most ~1024 x 18
# readings x 256 characters, some 5 MB, for an attacker churning it).
MEMO_LENGTH = 256
MEMO_ENTRIES = 1024
_HEX = "0123456789abcdefABCDEF"
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL_ESCAPE = re.compile(r"%(?:[01][0-9A-Fa-f]|7[Ff])")
# Each hex pair (in any case) to its canonical form: the unreserved character, or the
# escape upper-cased.
_NORMAL_ESCAPES = {
    a + b: (chr(int(a + b, 16)) if chr(int(a + b, 16)) in UNRESERVED else "%" + (a + b).upper())
    for a in _HEX
    for b in _HEX
}
# Paths that no reading changes except lower-casing: no escapes, backslashes, ;params,
# repeated slashes or segments ending in a dot (which also catches "." and "..").
_PLAIN = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
_VISIBLE = re.compile(r"[!-~]*")
_SLASHES = re.compile(r"//+")
# A segment ending in a dot or a space (raw spaces are refused, so only %20 remains).
_DOT_OR_SPACE_END = re.compile(r"(\.|%20)(?=/|$)")
# The same in a reading (made visible again, so a space is %20), before backslashes
# and ;params have made the segments.
_TRAILING = re.compile(r"(?:\.|%20)(?=[/;\\]|$)")
# Dots and spaces ending a segment that has something else in it ("a. ", "a..").
_TRAILING_IN_SEGMENT = re.compile(r"(?<![/.])(?:\.|%20)+(?=/|$)")
# A segment of nothing but dots and spaces ("...", ".. ").
_DOTS_ONLY = re.compile(r"(?<=/)(?:\.|%20)+(?=/|$)")
_PARAMS = re.compile(r";[^/]*")
# A segment that may hide a dot segment: a dot, an escape, a backslash or a ; in it.
_DOTTY = re.compile(r"[.%\\;]")
_INVISIBLE = re.compile(r"[^!-~]|[#?]")
_PLAIN_UPPER = re.compile(r"[A-Z]")
# An upper-case letter that is not the hex digit of an escape.
_UPPER = re.compile(r"(?<!%)(?<!%.)[A-Z]")
_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*")


class PathError(ValueError):
    """A path the gateway refuses; the message is the short reason for the answer, whose
    status is ``status`` (400, or 414 for a path over ``paths.max_length``)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


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
    return _structure(_escaped(raw_path), merge_slashes)


def readings(raw_path: str, merge_slashes: bool, *, lower: bool = True) -> list[str]:
    """Other readings of ``raw_path`` a backend may make, each canonicalised, without
    the canonical one and without repeats (raises PathError like :func:`canonical`).

    Read as: decoded once and twice, ``\\`` as ``/``, ``;params`` dropped from every
    segment, trailing dots and spaces dropped from every segment, lower-cased
    (``lower=False`` leaves that out), and all of these together; each with
    repeated slashes merged, whatever ``merge_slashes`` says, because the backend may
    merge them. A decoded reading can hold bytes a raw path may not (controls, ``%zz``,
    non-ASCII): they are kept encoded rather than the reading dropped, or
    ``/%2Faccount/x%2500`` would escape the check.
    """
    return list(read(raw_path, merge_slashes, lower=lower)[1])


def read(raw_path: str, merge_slashes: bool, *, lower: bool = True) -> tuple[str, Iterable[str]]:
    """:func:`canonical` and :func:`readings` at once, sharing the work (the router's
    call). The readings of a long path come lazily, so a caller can stop at the first
    that matters."""
    if _is_plain(raw_path):
        # The common case: nothing but the case can read differently.
        if lower and _PLAIN_UPPER.search(raw_path):
            return raw_path, (raw_path.lower(),)
        return raw_path, ()
    if len(raw_path) <= MEMO_LENGTH:
        return _read_memo(raw_path, merge_slashes, lower)
    escaped = _escaped(raw_path)
    canon = _structure(escaped, merge_slashes)
    return canon, _others(raw_path, escaped, canon, lower)


@functools.lru_cache(maxsize=MEMO_ENTRIES)
def _read_memo(raw_path: str, merge_slashes: bool, lower: bool) -> tuple[str, tuple[str, ...]]:
    # Paths with escapes repeat (a shop's pages with accented names): reading one costs
    # some 8 us, a hit well under 1. A PathError is not remembered.
    escaped = _escaped(raw_path)
    canon = _structure(escaped, merge_slashes)
    return canon, tuple(_others(raw_path, escaped, canon, lower))


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


def climbs_elsewhere(raw_path: str) -> bool:
    """Whether a segment of ``raw_path`` that is not ``.`` or ``..`` reads as one to some
    backend: decoded
    (``%252e%252e``), split at a backslash (``a\\..``), its ``;params`` dropped
    (``..;x``), its trailing dots and spaces dropped (``...``, ``..%20``).

    SECURITY: such a segment climbs for the backend where it does not for the gateway,
    and the climb composes with everything around it: ``/a/..;/account/x/..;/..`` is
    ``/a/..;/account/x/`` to the gateway (the ``/`` route) and ``/account/x/`` to Tomcat.
    No legitimate URL needs one, so it is refused rather than read every way."""
    if _is_plain(raw_path) or not _DOTTY.search(raw_path):
        return False  # a plain path has no segment ending in a dot, nor escapes
    for seg in raw_path.split("/"):
        if "." not in seg and "%" not in seg:
            continue
        if _escapes(seg, lenient=True) in ("", ".", ".."):
            continue  # a dot segment to the gateway too (``%2e%2E`` is ``..``)
        decoded = unquote_to_bytes(unquote_to_bytes(seg).decode("latin-1")).decode("latin-1")
        for piece in decoded.replace("\\", "/").split("/"):
            piece = piece.split(";", 1)[0]
            if piece in (".", ".."):
                return True
            if piece and piece.strip(". ") == "" and "." in piece:
                return True  # dots and spaces only ("...", ".. ")
    return False


def _escaped(raw_path: str) -> str:
    """``raw_path`` checked, with its escapes normalised (the first step of canonical)."""
    if not raw_path.startswith("/"):
        raise PathError("path must start with /")
    if not _VISIBLE.fullmatch(raw_path):
        raise PathError("path must be visible ASCII")
    if "#" in raw_path:
        raise PathError("# in path")
    return _escapes(raw_path, lenient=False)


def _others(raw_path: str, escaped: str, canon: str, lower: bool) -> Iterator[str]:
    """The readings of ``raw_path`` other than ``canon``. ``escaped`` is ``raw_path``
    with its escapes normalised: the undecoded base, with ``%2e`` already a dot."""
    bases = [escaped]
    for decoded in _decodings(raw_path):
        v = _visible(decoded)
        if v not in bases:
            bases.append(v)
    seen = {canon}
    for base in bases:
        for variant in _variants(base, lower):
            r = _structure(_escapes(variant, lenient=True), merge_slashes=True)
            if r not in seen:
                seen.add(r)
                yield r


def _escapes(path: str, *, lenient: bool) -> str:
    """Percent escapes normalised: unreserved characters decoded, the rest upper-cased.
    Strict: a malformed escape or an encoded control byte is a PathError. Lenient (for
    readings): a stray ``%`` becomes ``%25`` and control bytes stay encoded."""
    if "%" not in path:
        return path
    if lenient:
        path = _BAD_ESCAPE.sub("%25", path)
    elif _BAD_ESCAPE.search(path):
        raise PathError("malformed percent escape in path")
    elif _CONTROL_ESCAPE.search(path):
        raise PathError("encoded control character in path")
    return _ESCAPE.sub(_normal_escape, path)


def _normal_escape(m: re.Match[str]) -> str:
    return _NORMAL_ESCAPES[m[1]]


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
    """The raw path decoded once, then twice (IIS), as long as each changes it. One
    character per byte (latin-1), so no byte is lost before :func:`_visible`."""
    path = raw_path
    for _ in range(2):
        if "%" not in path:
            return
        decoded = unquote_to_bytes(path).decode("latin-1")
        if decoded == path:
            return
        yield decoded
        path = decoded


# Whole-string substitutions, not loops over segments: a hostile path may have
# thousands of them.
def _backslash(path: str) -> str:
    return path.replace("\\", "/")


def _no_params(path: str) -> str:
    return _PARAMS.sub("", path)


def _no_trailing_dots(path: str) -> str:
    return _DOTS_ONLY.sub(_dot_segment, _TRAILING_IN_SEGMENT.sub("", path))


def _dot_segment(m: re.Match[str]) -> str:
    # How Windows reads "..." or ".. " is not something to bet a route on: read the way
    # that climbs (".." with two dots or more), so the other route is found if any.
    dots = m[0].count(".")
    return ".." if dots >= 2 else "." if dots else ""


def _variants(path: str, lower: bool) -> Iterator[str]:
    """``path`` as it is, under each transform that can change it, then under all of
    them together (in this order: backslashes first, they make segments)."""
    steps: list[Callable[[str], str]] = []
    if "\\" in path:
        steps.append(_backslash)
    if ";" in path:
        steps.append(_no_params)
    if _TRAILING.search(path):
        steps.append(_no_trailing_dots)
    if lower and _UPPER.search(path):
        # Every base is ASCII by now (see _visible), so only ASCII letters change.
        steps.append(str.lower)
    yield path
    for step in steps:
        yield step(path)
    if len(steps) > 1:
        for step in steps:
            path = step(path)
        yield path


def _visible(path: str) -> str:
    """A decoded reading made visible ASCII again: every other byte, ``#`` and ``?``
    percent-encoded (they are data in a decoded path)."""
    return _INVISIBLE.sub(_percent, path)


def _percent(m: re.Match[str]) -> str:
    return f"%{ord(m[0]):02X}"


# -- item patterns (for plugins that read an item out of a path) ---------------------------


def item_pattern(pattern: str) -> re.Pattern[str]:
    """``/products/{item}`` → a regex whose group ``item`` is one path segment."""
    head, sep, tail = pattern.partition("{item}")
    if not sep or "{item}" in tail or not pattern.startswith("/"):
        raise ValueError("must start with / and contain {item} exactly once")
    return re.compile(re.escape(head) + r"(?P<item>[^/]{1,200})" + re.escape(tail))


def item_of(pattern: re.Pattern[str], path: str) -> str | None:
    """The item a canonical path (``ctx.path``) names under ``pattern``, percent-decoded,
    or None. A segment that decodes to a slash, to something unprintable or to bytes
    that are not UTF-8 names no item: it could not be told apart from another path, or
    stored as a Redis member."""
    m = pattern.fullmatch(path)
    if m is None:
        return None
    try:
        item = unquote(m.group("item"), errors="strict")
    except UnicodeDecodeError:
        return None
    return item if item.isprintable() and "/" not in item else None
