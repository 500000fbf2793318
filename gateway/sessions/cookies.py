"""The session cookie: reading it from a request, and the Set-Cookie values a request
decides on (kept on ``ctx.cookies``, so every answer carries them, whoever makes it)."""

from __future__ import annotations

from collections.abc import Iterable

from ..config import Settings
from ..headers import parse_cookie_values, set_cookie_name


def cookie_attributes(
    path: str, domain: str | None, http_only: bool, secure: bool, same_site: str
) -> str:
    """The attributes of a Set-Cookie value after ``name=value``, as ``Path=/; ...``."""
    attrs = [f"Path={path}"]
    if domain:
        attrs.append(f"Domain={domain}")
    if http_only:
        attrs.append("HttpOnly")
    if secure:
        attrs.append("Secure")
    attrs.append(f"SameSite={same_site}")
    return "; ".join(attrs)


def expired_cookie(name: str, attributes: str) -> str:
    """A Set-Cookie value that removes cookie ``name`` (set with ``attributes``)."""
    return f"{name}=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; {attributes}"


class SessionCookie:
    def __init__(self, settings: Settings) -> None:
        c = settings.session.cookie
        self.name = c.name
        self.forward = c.forward
        tail = cookie_attributes(c.path, c.domain, c.http_only, c.secure, c.same_site)
        # Both fixed by the config, so built once.
        self._tail = f"; Max-Age={settings.session.absolute_ttl}; {tail}"
        self.expired = expired_cookie(c.name, tail)

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
