"""The client of this node's meshd: HTTP/1.1 over its Unix socket, on the standard library's sockets alone.

``meshctl agent run``, ``status`` and ``whois`` are on a person's (or an
agent platform's) critical path, and the whole command must feel instant:
httpx costs ~60 ms to import here, and even ``http.client`` 25 ms (it
brings ``ssl`` and the ``email`` package). A Unix socket needs no TLS, no
proxy and no pool, and the server is our own meshd (uvicorn), so one
request per connection (``Connection: close``), read to the end, is all
there is: a status line, headers, and a body framed by ``Content-Length``
or chunks. (The controller's client, with pinned TLS and client
certificates, stays on httpx: :mod:`idmesh.client`.)
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from meshcore.errors import IdmeshError, Unavailable, error_for_status

__all__ = ["LocalClient", "error_of_answer"]

TIMEOUT = 30.0
"""An agent's birth waits for the controller's certificate: generous, so a slow controller is an error it names."""


def error_of_answer(status: int, body: bytes, who: str) -> IdmeshError:
    """The error an answer of status >= 400 stands for: its ``{"error": "..."}`` line (every idmesh
    server answers so), or the bare status when a proxy or something else answered instead."""
    try:
        message = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        message = f"{who} answered HTTP {status}"
    return error_for_status(status, str(message))


class _Malformed(ValueError):
    pass


def _parse(raw: bytes) -> tuple[int, bytes]:
    """A whole HTTP/1.1 answer: its status and body."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise _Malformed("not an HTTP answer")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = bytearray()
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
        return int(parts[1]), bytes(body)
    length = headers.get(b"content-length")
    return int(parts[1]), rest if length is None else rest[:int(length)]


class LocalClient:
    """The local meshd's API over its Unix socket; answers are JSON, errors :mod:`meshcore.errors`' exceptions."""

    def __init__(self, socket_path: Path, timeout: float = TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        return self.request("GET", path, params=params)

    def request(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        if params:
            from urllib.parse import urlencode  # only whois and a few listings take a query

            path = f"{path}?{urlencode(params)}"
        payload = b"" if body is None else json.dumps(body).encode()
        request = (f"{method} {path} HTTP/1.1\r\nHost: meshd\r\nConnection: close\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.socket_path))
                sock.sendall(request)
                chunks = []
                while data := sock.recv(65536):
                    chunks.append(data)
            status, answer = _parse(b"".join(chunks))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise Unavailable(f"meshd is not running or not reachable at {self.socket_path}: {exc.strerror}") from exc
        except TimeoutError as exc:
            raise Unavailable(f"talking to meshd at {self.socket_path} failed: no answer in {self.timeout:g} s") from exc
        except (OSError, ValueError) as exc:
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise Unavailable(f"talking to meshd at {self.socket_path} failed: {why}") from exc
        if status >= 400:
            raise error_of_answer(status, answer, "meshd")
        return json.loads(answer)
