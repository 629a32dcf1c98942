"""meshd's local API: HTTP on a Unix socket (``--socket``, mode 0660).

``meshctl status`` and, later, ``whois`` and ``agent run`` talk to it. The
socket's file mode is the access control: root and the socket's group.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from meshcore.errors import IdmeshError, PermissionDenied

__all__ = ["LocalApi", "bind_unix_socket"]



class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: meshd owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind_unix_socket(path: Path) -> socket.socket:
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if path.is_socket():
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # left by a meshd that died: nobody listens
            else:
                raise PermissionDenied(f"another meshd is already listening on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o117)  # the socket is born 0660, never briefly wider
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        return sock
    except OSError as exc:
        raise PermissionDenied(f"cannot create the local API socket {path}: {exc.strerror or exc}") from exc


class LocalApi:
    def __init__(self, path: Path, status: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        app = FastAPI(title="meshd local API", docs_url=None, redoc_url=None)

        @app.exception_handler(IdmeshError)
        async def _error(_: Any, exc: IdmeshError) -> JSONResponse:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)

        @app.get("/v1/status")
        async def get_status() -> dict[str, Any]:
            return status()

        self.app = app
        self._server = _EmbeddedServer(uvicorn.Config(app, log_level="warning", lifespan="off", ws="none"))

    async def serve(self) -> None:
        sock = bind_unix_socket(self.path)
        try:
            await self._server.serve(sockets=[sock])
        finally:
            sock.close()
            self.path.unlink(missing_ok=True)

    def stop(self) -> None:
        self._server.should_exit = True
