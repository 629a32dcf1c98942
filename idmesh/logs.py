"""Logging for the daemons: readable on a terminal, JSON lines elsewhere.

Under systemd or a log shipper each record is one JSON object (``ts``,
``level``, ``logger``, ``msg``, and ``request_id`` when the record was made
while serving a request), so logs can be searched by field. Nothing here
formats secrets: keys, tokens and certificates are never passed to a log
call, and token lines are redacted should one slip into a message.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime

__all__ = ["request_id", "setup_logging"]

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_TOKEN = re.compile(r"idm1\.[A-Za-z0-9_-]{8,}")
_QUIET = ("httpx", "httpcore", "pyroute2", "zeroconf", "uvicorn", "uvicorn.error", "uvicorn.access", "asyncssh")


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        # The whole message, arguments merged in: a token passed as an argument is redacted too.
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # bad arguments: the handler reports them as logging always has
            return True
        redacted = _TOKEN.sub("idm1.<redacted>", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class _Once(logging.Filter):
    """uvicorn logs every unhandled error again ("Exception in ASGI application") after the API's own
    handler logged it with its method and path: once is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Exception in ASGI application"


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if getattr(record, "request_id", None):
            doc["request_id"] = record.request_id  # type: ignore[attr-defined]
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(verbose: bool = False, json_lines: bool | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    as_json = not sys.stderr.isatty() if json_lines is None else json_lines
    handler.setFormatter(_Json() if as_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Context())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    # uvicorn's loggers go through this handler too (its servers are made with log_config=None): JSON, once
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _Once) for f in uvicorn_errors.filters):
        uvicorn_errors.addFilter(_Once())
