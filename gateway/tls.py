"""HTTPS on the proxy listener (``listen_tls``), for deployments without a TLS-terminating
balancer in front.

The context is built once per process, before anything listens, so a certificate or key
that cannot be loaded stops the start (and ``--check``) with one line naming the key.
"""

from __future__ import annotations

import os
import ssl
import stat

from .config import ConfigError, Settings, TlsSettings


def _no_password() -> bytes:
    # Without a callback OpenSSL asks for an encrypted key's passphrase on the terminal,
    # which would hang a service or --check. An empty one makes it fail instead.
    return b""


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """A server-side context: the ssl module's defaults for servers, ``min_version``,
    HTTP/1.1 only. Raises ConfigError naming ``listen_tls.cert`` or ``listen_tls.key``."""
    for name, path in (("cert", tls.cert), ("key", tls.key)):
        try:
            # A regular file only: reading a FIFO or a device could wait forever.
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise ConfigError(f"listen_tls.{name}: {path} is not a regular file")
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ConfigError(f"listen_tls.{name}: cannot read {path}: {e.strerror}") from None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion[tls.min_version.replace(".", "_")]
    # aiohttp's server speaks HTTP/1.1 only: never let a client negotiate h2.
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(tls.cert, tls.key, password=_no_password)
    except ssl.SSLError as e:
        raise ConfigError(_load_error(tls, e)) from None
    except OSError as e:  # a file gone or changed since it was checked above
        raise ConfigError(f"listen_tls.cert: cannot load {tls.cert}: {e.strerror}") from None
    return ctx


def _load_error(tls: TlsSettings, e: ssl.SSLError) -> str:
    """Which file is at fault: OpenSSL says only "PEM lib" for either."""
    if e.reason == "KEY_VALUES_MISMATCH":
        return f"listen_tls.key: {tls.key} is not the key of the certificate in {tls.cert}"
    try:
        ssl.create_default_context().load_verify_locations(cafile=tls.cert)
    except ssl.SSLError:
        return f"listen_tls.cert: no PEM certificate in {tls.cert}"
    return f"listen_tls.key: no unencrypted PEM private key in {tls.key}"


def listeners(
    settings: Settings, context: ssl.SSLContext | None
) -> list[tuple[str, ssl.SSLContext | None]]:
    """Each address the proxy listens on, with its TLS context (None: plain HTTP)."""
    tls = settings.listen_tls
    if tls is None:
        return [(settings.listen, None)]
    if context is None:
        raise ValueError("listen_tls is set: pass server_context(settings.listen_tls)")
    if tls.listen is None:
        return [(settings.listen, context)]
    return [(settings.listen, None), (tls.listen, context)]
