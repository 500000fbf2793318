"""Backend instruction headers (X-Session-Login, -Set, -Logout, -Cart-*): which ones a
route accepts, and how each is parsed. Everything refused is logged and counted."""

from __future__ import annotations

import logging

from multidict import CIMultiDictProxy

from . import metrics
from .headers import SESSION_PREFIX, normalized, parse_params

log = logging.getLogger("gateway.instructions")

# header (normalized) -> the `instructions:` entry that allows it
INSTRUCTION_HEADERS = {
    "x-session-login": "login",
    "x-session-set": "set",
    "x-session-logout": "logout",
    "x-session-cart-add": "cart",
    "x-session-cart-remove": "cart",
    "x-session-cart-clear": "cart",
}


def collect(headers: CIMultiDictProxy[str], allowed: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """The instructions in a backend response that this route allows, parsed, keyed by
    normalized header name. Unknown, disallowed, duplicated and malformed ones are
    dropped here: a header given twice is refused rather than guessed at."""
    found: dict[str, list[str]] = {}
    for name, value in headers.items():
        norm = normalized(name)
        if norm.startswith(SESSION_PREFIX):
            found.setdefault(norm, []).append(value)
    parsed: dict[str, dict[str, str]] = {}
    for name, values in found.items():
        kind = INSTRUCTION_HEADERS.get(name)
        label = name.removeprefix("x-session-")
        if kind is None:
            dropped(label, "unknown")
        elif kind not in allowed:
            dropped(label, "not-allowed")
        elif len(values) != 1:
            dropped(label, "duplicated")
        elif (params := parse_instruction(name, values[0])) is None:
            dropped(label, "malformed")
        else:
            parsed[name] = params
    return parsed


def parse_instruction(name: str, value: str) -> dict[str, str] | None:
    value = value.strip()
    if name == "x-session-logout":
        v = value.lower()
        return {v: "1"} if v in ("this", "all") else None
    if name == "x-session-cart-clear":
        return {"clear": "1"} if value in ("1", "true", "yes") else None
    return parse_params(value)


def dropped(instruction: str, why: str) -> None:
    metrics.INSTRUCTIONS.labels(instruction, why).inc()
    log.warning("instruction X-Session-%s dropped: %s", instruction.title(), why)
