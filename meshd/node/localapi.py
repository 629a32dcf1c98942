"""meshd's local API: HTTP on a Unix socket (``--socket``, mode 0660).

``meshctl status``, ``whois`` and ``agent run|list`` talk to it. The socket's
file mode is the access control (root and the socket's group). Every
request carries the caller's kernel-reported credentials (SO_PEERCRED) in
its scope, so the daemon knows *which process* asks — never from what the
request says.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import struct
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from meshcore.errors import IdmeshError, PermissionDenied
from meshcore.wire.local import (
    AgentRunAnswer,
    AgentRunRequest,
    LoginAnswer,
    LoginRequest,
    ServeInfo,
    ServeRequest,
    Status,
    Whois,
)

__all__ = ["PEERCRED", "Caller", "EmbeddedServer", "LocalApi", "LocalService", "bind_unix_socket"]

PEERCRED = "idmesh.peercred"


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: meshd owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of a local API connection, as the kernel says (SO_PEERCRED), never the request.

    ``pidfd`` pins the very process that connected (opened while its
    connection is open, so its pid cannot have been reused yet): a pid
    number alone could name a stranger once the caller is gone. It is closed
    with the connection.
    """

    pid: int
    uid: int
    gid: int
    pidfd: int | None

    def exited(self) -> bool:
        """Whether the process that connected has exited (its pid may now be someone else's)."""
        if self.pidfd is None:
            return False
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(0))


class _PeerCredProtocol(HttpToolsProtocol):  # httptools: C parsing, a birth is on every agent's path
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        try:
            pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except (OSError, AttributeError):
            caller = None
        else:
            try:
                pidfd: int | None = os.pidfd_open(pid)
            except OSError:
                pidfd = None
            caller = Caller(pid, uid, gid, pidfd)
        self._caller = caller
        app = self.app

        async def with_cred(scope: dict[str, Any], receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {})[PEERCRED] = caller
            await app(scope, receive, send)

        self.app = with_cred

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._caller is not None and self._caller.pidfd is not None:
            os.close(self._caller.pidfd)


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


class LocalService(Protocol):
    """What the local API answers with (the daemon)."""

    def status(self) -> Status: ...

    def whois(self, address: str) -> Whois: ...

    def list_agents(self) -> list[dict[str, Any]]: ...

    async def run_agent(self, caller: Caller, req: AgentRunRequest) -> AgentRunAnswer: ...

    async def start_login(self, caller: Caller, req: LoginRequest) -> LoginAnswer: ...

    async def poll_login(self, caller: Caller, login_id: str) -> dict[str, Any]: ...

    def list_serves(self) -> list[ServeInfo]: ...

    async def put_serve(self, caller: Caller, req: ServeRequest) -> ServeInfo: ...

    async def remove_serve(self, caller: Caller, port: int) -> None: ...


def _caller(request: Request) -> Caller:
    caller = request.scope.get("extensions", {}).get(PEERCRED)
    if caller is None:
        raise PermissionDenied("the caller's process could not be identified (SO_PEERCRED)")
    assert isinstance(caller, Caller)
    return caller


class LocalApi:
    def __init__(self, path: Path, node: LocalService) -> None:
        self.path = path
        app = FastAPI(title="meshd local API", docs_url=None, redoc_url=None)

        @app.exception_handler(IdmeshError)
        async def _error(_: Any, exc: IdmeshError) -> JSONResponse:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)

        @app.exception_handler(RequestValidationError)
        async def _invalid(_: Any, exc: RequestValidationError) -> JSONResponse:
            first = exc.errors()[0] if exc.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            return JSONResponse({"error": f"malformed request: {where}: {first.get('msg', 'invalid')}"},
                                status_code=422)

        # The answers are TypedDicts for mypy; FastAPI sends them as they are (response_model=None).
        @app.get("/v1/status", response_model=None)
        async def get_status() -> Status:
            # In a worker thread, as a metrics scrape is: reading the WireGuard device may wait for a
            # device update in progress, and the event loop (births, the stream) must not wait with it.
            return await asyncio.to_thread(node.status)

        @app.get("/v1/whois", response_model=None)
        async def get_whois(address: str) -> Whois:
            return node.whois(address)

        @app.get("/v1/agents")
        async def get_agents() -> list[dict[str, Any]]:
            return node.list_agents()

        @app.post("/v1/agents", response_model=None)
        async def post_agent(req: AgentRunRequest, request: Request) -> AgentRunAnswer:
            return await node.run_agent(_caller(request), req)

        @app.post("/v1/login", response_model=None)
        async def post_login(req: LoginRequest, request: Request) -> LoginAnswer:
            return await node.start_login(_caller(request), req)

        @app.post("/v1/login/{login_id}", response_model=None)
        async def poll_login(login_id: str, request: Request) -> dict[str, Any]:
            return await node.poll_login(_caller(request), login_id)

        @app.get("/v1/serve", response_model=None)
        async def get_serves() -> list[ServeInfo]:
            return node.list_serves()

        @app.post("/v1/serve", response_model=None)
        async def post_serve(req: ServeRequest, request: Request) -> ServeInfo:
            return await node.put_serve(_caller(request), req)

        @app.delete("/v1/serve/{port}", response_model=None)
        async def delete_serve(port: int, request: Request) -> dict[str, Any]:
            await node.remove_serve(_caller(request), port)
            return {"removed": port}

        self.app = app
        config = uvicorn.Config(app, log_level="warning", log_config=None, lifespan="off", ws="none",
                                http=_PeerCredProtocol)  # (log_config=None: through our JSON handler)
        self._server = EmbeddedServer(config)

    async def serve(self) -> None:
        sock = bind_unix_socket(self.path)
        try:
            await self._server.serve(sockets=[sock])
        finally:
            sock.close()
            self.path.unlink(missing_ok=True)

    def stop(self) -> None:
        self._server.should_exit = True
