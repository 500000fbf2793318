"""The session cookie: reading it from a request, and the Set-Cookie values a request
decides on (kept on ``ctx.cookies``, so every answer carries them, whoever makes it)."""

from __future__ import annotations

from collections.abc import Iterable

from ..config import Settings
from ..headers import parse_cookie_values, set_cookie_name


class SessionCookie:
    def __init__(self, settings: Settings) -> None:
        c = settings.session.cookie
        self.name = c.name
        self.forward = c.forward
        attrs = [f"Path={c.path}"]
        if c.domain:
            attrs.append(f"Domain={c.domain}")
        if c.http_only:
            attrs.append("HttpOnly")
        if c.secure:
            attrs.append("Secure")
        attrs.append(f"SameSite={c.same_site}")
        tail = "; ".join(attrs)
        # Both fixed by the config, so built once.
        self._tail = f"; Max-Age={settings.session.absolute_ttl}; {tail}"
        self.expired = f"{c.name}=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; {tail}"

    def values(self, cookie_headers: Iterable[str]) -> list[str]:
        """Every value the client sent for the session cookie (several means: none)."""
        return parse_cookie_values(cookie_headers, self.name)

    def for_token(self, token: str) -> str:
        return f"{self.name}={token}{self._tail}"

    def replace(self, cookies: list[str], cookie: str) -> None:
        """``cookie`` replaces whatever this request had decided for the session cookie
        (a guest's, or the one a login just set before a logout)."""
        cookies[:] = [c for c in cookies if set_cookie_name(c) != self.name]
        cookies.append(cookie)
