"""meshd's requests to the controller on kept-alive TLS connections: asyncio streams, httptools parsing.

Every agent's birth and end is one request to the controller, so their
cost is a node's birth rate. With httpx (which the netmap stream keeps)
the requests were half of meshd's CPU at twenty births at once — its
connection pool and anyio's TLS stream, measured with py-spy under
``bench/bench_agents.py``. A request here is one write and the C parser
of uvicorn's own HTTP stack (httptools) over the answer; connections are
kept in a free list, one per request in flight.

Only what this node's calls need: JSON bodies, ``Content-Length`` or
chunked answers, keep-alive. A request is sent again on a new connection
only when a kept one turns out closed before any answer byte came back
(the controller closes idle connections after a few seconds), which the
controller cannot have acted on.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from urllib.parse import urlsplit

import httptools

from meshcore.errors import Unavailable, Unreachable

__all__ = ["ControllerCalls"]

KEEP_IDLE = 16
"""Connections kept open for the next requests (as many as births at once, give or take)."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._body: list[bytes] = []
        self._complete = self._keep = False
        self._parser = httptools.HttpResponseParser(self)

    # httptools' callbacks
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._complete = True
        self._keep = self._parser.should_keep_alive()  # (it says False once the message is over)

    async def exchange(self, request: bytes) -> tuple[int, bytes, bool]:
        """Send ``request``; the answer's status, body and whether the connection may be used again."""
        self._body, self._complete, self._keep = [], False, False
        self._parser = parser = httptools.HttpResponseParser(self)
        self.writer.write(request)
        while not self._complete:
            data = await self.reader.read(65536)
            if not data:
                raise _Closed(answered=bool(self._body) or parser.get_status_code() != 0)
            parser.feed_data(data)
        return parser.get_status_code(), b"".join(self._body), self._keep

    @property
    def stale(self) -> bool:
        return self.reader.at_eof() or self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class _Closed(ConnectionError):
    def __init__(self, *, answered: bool) -> None:
        super().__init__("the controller closed the connection")
        self.answered = answered


def _reason(exc: BaseException, *, connected: bool) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = (os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno and not isinstance(exc, ssl.SSLError)
            else str(exc) or type(exc).__name__)
    return text if connected else f"cannot connect ({text})"


class ControllerCalls:
    """Requests to ``url`` (``https://host:port``) with ``context`` (the node's certificate, the mesh CA)."""

    def __init__(self, url: str, context: ssl.SSLContext, headers: dict[str, str], timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.hostname is None:
            raise ValueError(f"no host in {url!r}")
        self.url, self._host, self._port = url, parts.hostname, parts.port or 443
        self._context, self._timeout = context, timeout
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._head = f"Host: {parts.netloc}\r\n{extra}"
        self._idle: list[_Connection] = []

    async def request(self, method: str, path: str, body: object = None) -> tuple[int, bytes]:
        """The answer's status and body; Unavailable when the controller cannot be reached or answer
        (:class:`~meshcore.errors.Unreachable` when no connection could be made: nothing was sent)."""
        payload = b"" if body is None else json.dumps(body).encode()
        request = (f"{method} {path} HTTP/1.1\r\n{self._head}Content-Type: application/json\r\n"
                   f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
        while True:
            conn, kept = self._take()
            try:
                if conn is None:
                    async with asyncio.timeout(self._timeout):
                        conn = await self._connect()
                async with asyncio.timeout(self._timeout):
                    status, data, reusable = await conn.exchange(request)
            except _Closed as exc:
                assert conn is not None
                conn.close()
                if kept and not exc.answered:
                    continue  # closed while idle: the request never reached the controller
                raise Unavailable(f"controller {self.url}: {exc}") from exc
            except (OSError, TimeoutError, httptools.HttpParserError) as exc:
                if conn is None:  # not connected: the request was never sent, another replica may take it
                    raise Unreachable(f"controller {self.url}: {_reason(exc, connected=False)}") from exc
                conn.close()
                raise Unavailable(f"controller {self.url}: {_reason(exc, connected=True)}") from exc
            if reusable and len(self._idle) < KEEP_IDLE:
                self._idle.append(conn)
            else:
                conn.close()
            return status, data

    def _take(self) -> tuple[_Connection | None, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.stale:
                return conn, True
            conn.close()
        return None, False

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self._host, self._port, ssl=self._context,
                                                       server_hostname=self._host)
        return _Connection(reader, writer)

    def close(self) -> None:
        """Close every kept connection (the node certificate changed, or meshd stops)."""
        for conn in self._idle:
            conn.close()
        self._idle.clear()
