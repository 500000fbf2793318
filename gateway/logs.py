"""One line per event; JSON on request. Every line carries the request id when there is
one, through a context variable that each request's task sets."""

from __future__ import annotations

import contextvars
import logging
import sys
import time

import orjson
from aiohttp.http_exceptions import HttpProcessingError

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            doc["request_id"] = rid
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            # An access line (access_log.py): its fields are the document's own.
            doc["msg"] = "access"
            doc.update(access)
        if record.exc_info:
            # One line even for a traceback: log shippers split on newlines.
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", "")
        t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{t} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if rid:
            line += f" [rid={rid}]"
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return line


class Throttle:
    """At most ``burst`` lines per ``period`` seconds for one kind of event; the rest are
    counted and reported in the next line that gets through. A client that sends
    thousands of malformed requests must not be able to flood the log (or fill a disk)."""

    def __init__(self, burst: int = 10, period: float = 10.0) -> None:
        self.burst = burst
        self.period = period
        self._window = 0.0
        self._count = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._window >= self.period:
            self._window = now
            self._count = 0
        self._count += 1
        if self._count > self.burst:
            self.suppressed += 1
            return False
        return True

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n


class _ParseErrorFilter(logging.Filter):
    """aiohttp logs every request its parser refuses as "Error handling request" with a
    traceback at ERROR. A malformed request is the client's problem, not the gateway's:
    one short line, throttled."""

    def __init__(self) -> None:
        super().__init__()
        self.throttle = Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        if not self.throttle.allow():
            return False
        first = str(exc.message).strip().splitlines()[0] if exc.message else type(exc).__name__
        more = self.throttle.take_suppressed()
        record.msg = "bad request refused by the parser: %s%s"
        record.args = (first[:200], f" ({more} more not logged)" if more else "")
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


PARSE_ERRORS = _ParseErrorFilter()


def setup(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp logs every access at INFO; the gateway's own access line is optional.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if PARSE_ERRORS not in server_log.filters:
        server_log.addFilter(PARSE_ERRORS)
