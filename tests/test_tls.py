"""HTTPS on the proxy listener (listen_tls): the gateway as a real process with a
self-signed certificate made by the openssl CLI, and real TLS clients."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.config import ConfigError, TlsSettings
from gateway.tls import server_context

from .conftest import ROOT, GatewayProcess, RedisServer, base_config, free_port, start_backend

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(
    OPENSSL is None, reason="the openssl CLI is needed to make a test certificate"
)


# How a client sees the server refuse its version: an alert (OpenSSL's own server), or
# the connection closed without one (uvloop's TLS layer).
REFUSED = ("TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "UNEXPECTED_EOF_WHILE_READING")


@dataclass
class Pki:
    cert: Path
    key: Path
    other_key: Path  # a valid key of another certificate
    encrypted_key: Path  # the right key, under a passphrase
    junk: Path

    def client(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


def _openssl(*args: str) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2")
    _openssl(
        "req", "-x509", *ec, "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"),
        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
    )  # fmt: skip
    _openssl(
        "req", "-x509", *ec, "-keyout", str(d / "other.pem"), "-out", str(d / "other-cert.pem"),
        "-subj", "/CN=other",
    )  # fmt: skip
    _openssl(
        "pkey", "-in", str(d / "key.pem"), "-aes128", "-passout", "pass:secret",
        "-out", str(d / "enc.pem"),
    )  # fmt: skip
    (d / "junk.pem").write_text("not a PEM file\n")
    os.mkfifo(d / "fifo")  # opening it would wait for a writer
    return Pki(d / "cert.pem", d / "key.pem", d / "other.pem", d / "enc.pem", d / "junk.pem")


def _tls(pki: Pki, **over: Any) -> dict[str, Any]:
    return {"cert": str(pki.cert), "key": str(pki.key), **over}


@dataclass
class Seen:
    proto: str | None
    user: str | None


def _backend(seen: list[Seen]) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.Response:
        seen.append(
            Seen(request.headers.get("X-Forwarded-Proto"), request.headers.get("X-Session-User-Id"))
        )
        resp = web.Response(text="ok")
        if request.path == "/login":
            resp.headers["X-Session-Login"] = "user_id=7"
        return resp

    return handle


def _https(pki: Pki) -> aiohttp.ClientSession:
    # unsafe: aiohttp's jar keeps no cookies of an IP-address host otherwise.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=pki.client()),
        cookie_jar=aiohttp.CookieJar(unsafe=True),
    )


def _handshake(port: int, ctx: ssl.SSLContext, alpn: list[str] | None = None) -> ssl.SSLSocket:
    if alpn:
        ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


# -- the context alone ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({"cert": "missing.pem"}, r"^listen_tls\.cert: cannot read .*missing\.pem: No such file"),
        ({"key": "missing.pem"}, r"^listen_tls\.key: cannot read .*missing\.pem: No such file"),
        ({"cert": "."}, r"^listen_tls\.cert: .* is not a regular file$"),
        ({"key": "fifo"}, r"^listen_tls\.key: .*fifo is not a regular file$"),
        ({"cert": "junk"}, r"^listen_tls\.cert: no PEM certificate in .*junk\.pem$"),
        ({"cert": "key"}, r"^listen_tls\.cert: no PEM certificate in .*key\.pem$"),
        ({"key": "junk"}, r"^listen_tls\.key: no unencrypted PEM private key in .*junk\.pem$"),
        ({"key": "cert"}, r"^listen_tls\.key: no unencrypted PEM private key in .*cert\.pem$"),
        ({"key": "encrypted_key"}, r"^listen_tls\.key: no unencrypted PEM private key in"),
        ({"key": "other_key"}, r"^listen_tls\.key: .*other\.pem is not the key of the cert"),
    ],
)
def test_unusable_cert_or_key_is_a_config_error_naming_it(
    pki: Pki, files: dict[str, str], error: str
) -> None:
    paths = {"cert": str(pki.cert), "key": str(pki.key)}
    for name, which in files.items():
        attr = getattr(pki, which, None)
        paths[name] = str(attr) if attr is not None else str(pki.cert.parent / which)
    with pytest.raises(ConfigError, match=error):
        server_context(TlsSettings(**paths))


def test_context_offers_http11_only_and_the_minimum_version(pki: Pki) -> None:
    ctx = server_context(TlsSettings(**_tls(pki, min_version="TLSv1.3")))
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode is ssl.CERT_NONE  # no client certificates asked for


# -- the gateway as a process --------------------------------------------------------------


def test_https_listener_forwards_proto_and_keeps_a_secure_cookie(
    gateway_process: Callable[[dict[str, Any]], GatewayProcess], redis_server: RedisServer, pki: Pki
) -> None:
    seen: list[Seen] = []

    async def scenario() -> None:
        runner, url = await start_backend(_backend(seen))
        try:
            cfg = base_config(redis_server.url, url)
            cfg["session"]["cookie"]["secure"] = True
            cfg["listen_tls"] = _tls(pki)
            gp = await asyncio.to_thread(gateway_process, cfg)
            base = f"https://127.0.0.1:{gp.port}"
            async with _https(pki) as s:
                async with s.post(base + "/login") as r:
                    assert r.status == 200
                    set_cookie = r.headers.getall("Set-Cookie")
                assert any(c.startswith("sid=") and "Secure" in c for c in set_cookie), set_cookie
                assert seen[-1].proto == "https"
                # The jar sends a Secure cookie over https only: the session comes back.
                async with s.get(base + "/account/orders") as r:
                    assert r.status == 200
                assert seen[-1] == Seen("https", "7")
            # Plain HTTP on the TLS port gets no answer from the proxy.
            async with aiohttp.ClientSession() as s:
                with pytest.raises(aiohttp.ClientError):
                    await s.get(f"http://127.0.0.1:{gp.port}/static/x")
            assert len(seen) == 2
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_extra_tls_listener_beside_the_plain_one(
    gateway_process: Callable[[dict[str, Any]], GatewayProcess], redis_server: RedisServer, pki: Pki
) -> None:
    seen: list[Seen] = []
    tls_port = free_port()

    async def scenario() -> None:
        runner, url = await start_backend(_backend(seen))
        try:
            cfg = base_config(redis_server.url, url)
            cfg["listen_tls"] = _tls(pki, listen=f"127.0.0.1:{tls_port}")
            gp = await asyncio.to_thread(gateway_process, cfg)
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{gp.port}/static/a") as r:
                    assert r.status == 200
            assert seen[-1].proto == "http"
            async with _https(pki) as s:
                async with s.get(f"https://127.0.0.1:{tls_port}/static/b") as r:
                    assert r.status == 200
            assert seen[-1].proto == "https"
            # A client's claim is not taken from an untrusted peer.
            async with _https(pki) as s:
                headers = {"X-Forwarded-Proto": "http"}
                async with s.get(f"https://127.0.0.1:{tls_port}/static/c", headers=headers) as r:
                    assert r.status == 200
            assert seen[-1].proto == "https"
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_alpn_offers_no_h2_and_old_versions_are_refused(
    gateway_process: Callable[[dict[str, Any]], GatewayProcess], redis_server: RedisServer, pki: Pki
) -> None:
    cfg = base_config(redis_server.url, "http://127.0.0.1:9")
    cfg["listen_tls"] = _tls(pki, min_version="TLSv1.3")
    gp = gateway_process(cfg)
    with _handshake(gp.port, pki.client(), ["h2", "http/1.1"]) as s:
        assert s.selected_alpn_protocol() == "http/1.1"
        assert s.version() == "TLSv1.3"
    # TLS 1.2 is fine for the ssl module's defaults, so only min_version refuses it.
    old = pki.client()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError) as e:
        _handshake(gp.port, old).close()
    assert e.value.reason in REFUSED, e.value
    with _handshake(gp.port, pki.client()) as s:
        assert s.version() == "TLSv1.3"


def test_tls11_refused_with_min_version_tls12(
    gateway_process: Callable[[dict[str, Any]], GatewayProcess], redis_server: RedisServer, pki: Pki
) -> None:
    cfg = base_config(redis_server.url, "http://127.0.0.1:9")
    cfg["listen_tls"] = _tls(pki, min_version="TLSv1.2")
    gp = gateway_process(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1_1
        ctx = pki.client()
        try:
            ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            # OpenSSL 3 offers TLS 1.1 only at security level 0.
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        except (ValueError, ssl.SSLError) as e:
            pytest.skip(f"this OpenSSL cannot be set to offer TLS 1.1: {e}")
    with pytest.raises(ssl.SSLError) as e:
        _handshake(gp.port, ctx).close()
    if e.value.reason in ("NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE"):
        pytest.skip(f"this OpenSSL does not offer TLS 1.1: {e.value}")
    assert e.value.reason in REFUSED, e.value
    # The same port still takes TLS 1.2.
    with _handshake(gp.port, pki.client()) as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")


def test_every_worker_speaks_tls(
    gateway_process: Callable[[dict[str, Any]], GatewayProcess], redis_server: RedisServer, pki: Pki
) -> None:
    seen: list[Seen] = []

    async def scenario() -> None:
        runner, url = await start_backend(_backend(seen))
        try:
            cfg = base_config(redis_server.url, url)
            cfg["workers"] = 2
            cfg["listen_tls"] = _tls(pki)
            gp = await asyncio.to_thread(gateway_process, cfg)
            prefixes: set[str] = set()
            deadline = time.monotonic() + 20
            # New connections until both workers answered (the second may start later).
            while len(prefixes) < 2 and time.monotonic() < deadline:
                async with _https(pki) as s:
                    async with s.get(f"https://127.0.0.1:{gp.port}/static/w") as r:
                        assert r.status == 200
                        prefixes.add(r.headers["X-Request-Id"][:16])
            assert len(prefixes) == 2, gp.log()
            assert {x.proto for x in seen} == {"https"}
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


# -- --check ----------------------------------------------------------------------------------


def _check(tmp_path: Path, cfg: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(path), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )


def test_check_refuses_an_unusable_certificate(tmp_path: Path, pki: Pki) -> None:
    cfg = base_config("redis://127.0.0.1:1/0", "http://127.0.0.1:9")
    cfg["listen_tls"] = _tls(pki)
    good = _check(tmp_path, cfg, "--check")
    assert good.returncode == 0, good.stderr
    cfg["listen_tls"] = _tls(pki, cert=str(tmp_path / "nope.pem"))
    for extra in (("--check",), ()):  # starting refuses it the same way
        bad = _check(tmp_path, cfg, *extra)
        assert bad.returncode == 2
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1, bad.stderr
        assert lines[0].startswith("config error: listen_tls.cert: cannot read "), lines
        assert "nope.pem" in lines[0]
    cfg["listen_tls"] = _tls(pki, key=str(pki.encrypted_key))
    bad = _check(tmp_path, cfg, "--check")  # no passphrase prompt, no hang
    assert bad.returncode == 2
    assert "listen_tls.key: no unencrypted PEM private key" in bad.stderr
