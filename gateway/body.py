"""The client's request body, read under limits (hardening, issue 10).

A client decides how fast its body arrives, so every read has a deadline: no byte for
``body_idle_timeout`` seconds, or the whole body not in within ``body_timeout``, is a
408; more than ``max_body_bytes`` (declared or counted) is a 413; a body the parser
refuses half-way (a malformed chunk, an oversized chunk extension or trailer) is a 400.
Each is a :class:`ClientBodyError`, raised to the proxy, which answers it and never
blames the upstream.

Small bodies (up to ``buffer_body_bytes``) are read whole before an upstream connection
is taken, so a pooled connection never waits on a slow client; larger ones stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from .config import LimitsSettings

CHUNK = 64 * 1024
# Longer than any length max_body_bytes allows, and than 2^63: a value a backend may read
# modulo 2^64 (and so as another length) never gets near one.
_MAX_LENGTH_DIGITS = 19


class ClientBodyError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def declared_length(request: web.BaseRequest, limit: int) -> int | None:
    """The Content-Length the client declared, checked (ClientBodyError otherwise);
    None for a chunked body or none at all.

    SECURITY: checked here whatever the parser did: aiohttp's pure-Python parser lets a
    length of 2^64 or more through, and a backend reading it modulo 2^64 would take
    what follows for another request. The value sent upstream is the gateway's own."""
    values = request.headers.getall("Content-Length", ())
    if not values:
        return None
    if len(values) > 1:
        raise ClientBodyError(400, "duplicate Content-Length")
    raw = values[0]
    if not raw.isascii() or not raw.isdigit() or len(raw) > _MAX_LENGTH_DIGITS:
        raise ClientBodyError(400, "invalid Content-Length")
    n = int(raw)
    if n > limit:
        raise ClientBodyError(413, "request body too large")
    return n


class RequestBody:
    """Reads ``request.content`` with the limits above: ``buffer`` first, then iterate
    for whatever ``buffer`` did not take."""

    def __init__(self, request: web.BaseRequest, limits: LimitsSettings) -> None:
        self._content = request.content
        self._limits = limits
        self.length = declared_length(request, limits.max_body_bytes)
        loop = asyncio.get_running_loop()
        self._loop = loop
        # The budget runs from the moment the head was handled, not from the first read.
        self._deadline = loop.time() + limits.body_timeout
        self._read = 0
        self._head: list[bytes] = []
        # Something was handed to the upstream: a failed connect can no longer be retried.
        self.started = False

    def is_started(self) -> bool:
        return self.started

    async def _chunk(self) -> bytes:
        left = self._deadline - self._loop.time()
        if left <= 0:
            raise ClientBodyError(408, "request body not received in time")
        try:
            async with asyncio.timeout(min(self._limits.body_idle_timeout, left)):
                chunk = await self._content.readany()
        except TimeoutError:
            raise ClientBodyError(408, "request body not received in time") from None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # A malformed chunk, an oversized chunk extension or trailer, a length the
            # stream does not reach (aiohttp's RequestPayloadError, its HttpProcessingError
            # family, a connection reset): the client's fault, not the upstream's.
            raise ClientBodyError(400, f"malformed request body ({type(e).__name__})") from None
        self._read += len(chunk)
        if self._read > self._limits.max_body_bytes:
            raise ClientBodyError(413, "request body too large")
        return chunk

    async def buffer(self, limit: int) -> bytes | None:
        """The whole body when it is at most ``limit`` bytes; None when it is larger
        (what was read is kept and comes first when the body is iterated)."""
        if self.length is not None and self.length > limit:
            return None
        size = 0
        while True:
            chunk = await self._chunk()
            if not chunk:
                body = b"".join(self._head)
                self._head.clear()
                return body
            self._head.append(chunk)
            size += len(chunk)
            if size > limit:
                return None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        self.started = True
        while self._head:
            yield self._head.pop(0)
        while chunk := await self._chunk():
            yield chunk
