"""The client of this node's meshd: HTTP/1.1 over its Unix socket, on the standard library alone.

``meshctl agent run``, ``status`` and ``whois`` are on a person's (or an
agent platform's) critical path, and the whole command must feel instant:
httpx costs ~60 ms to import here, ``http.client`` a few. A Unix socket
needs no TLS, no proxy handling and no connection pool — one request per
connection — so the standard library's HTTP parser on an ``AF_UNIX``
socket is all there is to it. (The controller's client, with pinned TLS and
client certificates, stays on httpx: :mod:`idmesh.client`.)
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

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


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("meshd", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class LocalClient:
    """The local meshd's API over its Unix socket; answers are JSON, errors :mod:`meshcore.errors`' exceptions."""

    def __init__(self, socket_path: Path, timeout: float = TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        return self.request("GET", path, params=params)

    def request(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        url = f"{path}?{urlencode(params)}" if params else path
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, url, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise Unavailable(f"meshd is not running or not reachable at {self.socket_path}: {exc.strerror}") from exc
        except (OSError, http.client.HTTPException) as exc:
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise Unavailable(f"talking to meshd at {self.socket_path} failed: {why}") from exc
        finally:
            conn.close()
        if resp.status >= 400:
            raise error_of_answer(resp.status, data, "meshd")
        return json.loads(data)
