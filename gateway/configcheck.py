"""The whole validation of a config file, the one ``--check``, start, a reload on SIGHUP
and ``health`` all run: the file itself (config.py), the plugins' options and what
routes name of them (chain.py), and the TLS files (tls.py). Raises ConfigError with the
one line that names the key."""

from __future__ import annotations

import ssl
from pathlib import Path

from .chain import validate_plugins
from .config import Settings, load_settings
from .redis.client import check_tls
from .tls import server_context


def load_checked(path: str | Path) -> tuple[Settings, ssl.SSLContext | None]:
    """The settings and, with ``listen_tls``, the server's TLS context (built here so
    that a bad certificate is a config error, not a start-up failure; each worker
    builds its own, an SSLContext does not cross processes)."""
    settings = load_settings(path)
    validate_plugins(settings)
    tls = server_context(settings.listen_tls) if settings.listen_tls else None
    check_tls(settings.redis.tls)
    return settings, tls
