"""The SPIFFE Workload Endpoint: a Unix socket anyone may connect to, whose caller the kernel names.

gRPC is grpcio's, with the official service definitions (py-spiffe ships
them generated from the SPIFFE project's ``workload.proto``). grpcio does
not tell a handler who is on the other end of a Unix socket, so meshd
holds the public socket itself: for each connection it reads the peer's
credentials (SO_PEERCRED, fixed by the kernel at ``connect``), holds a
pidfd on that process, and relays the bytes to grpcio's own socket in a
directory only root can reach, from a socket bound to a name of its own.
The handler finds the caller by that name (``context.peer()``) and asks,
per call, which agent's cgroup the process is in (SPIRE's unix workload
attestor does the same with the PID). A process whose pidfd says it has
exited is refused: its PID may already be a stranger's.

Per the Workload Endpoint specification a call without the metadata
``workload.spiffe.io: true`` is refused with InvalidArgument; a caller that
is no agent gets PermissionDenied ("no identity issued"), and so does an
agent once it has ended. An agent gets its own SVID only, a sub-agent its
own (its own cgroup).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import select
import shutil
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf import struct_pb2
from spiffe._proto import workload_pb2 as pb
from spiffe._proto import workload_pb2_grpc as pb_grpc

from meshcore.errors import IdmeshError, InvalidInput, PermissionDenied

from .svids import Svids

__all__ = ["WorkloadEndpoint"]

log = logging.getLogger("meshd.workload")
HEADER = "workload.spiffe.io"
MAX_CONNECTIONS = 1024
"""Connections held at once (each holds a pidfd and a relay); past it a new one is closed at once."""
_PEERCRED = struct.Struct("3i")


@dataclass
class _Caller:
    pid: int
    uid: int
    pidfd: int

    def alive(self) -> bool:
        return not select.select([self.pidfd], [], [], 0)[0]  # a pidfd turns readable when its process exits


class WorkloadEndpoint(pb_grpc.SpiffeWorkloadAPIServicer):
    def __init__(self, path: Path, svids: Svids, agent_of_pid: Callable[[int], str | None],
                 count: Callable[[str, str], None] = lambda method, code: None) -> None:
        self.path = path
        self._count = count  # (method, answer code): idmesh_workload_calls_total
        self.private = path.with_name(f".{path.name}.d")  # grpcio's socket and the relays' names: root only
        self.svids = svids
        self._agent_of_pid = agent_of_pid
        self._callers: dict[str, _Caller] = {}  # by the name grpcio sees as the peer
        self._numbers = itertools.count(1)
        self._grpc: grpc.aio.Server | None = None
        self._public: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self._full = False

    # -- the socket ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        shutil.rmtree(self.private, ignore_errors=True)
        self.private.mkdir(mode=0o700, parents=True)
        self._grpc = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024)])
        pb_grpc.add_SpiffeWorkloadAPIServicer_to_server(self, self._grpc)  # type: ignore[no-untyped-call]
        self._grpc.add_insecure_port(f"unix:{self.private / 'grpc.sock'}")
        await self._grpc.start()
        self.path.unlink(missing_ok=True)
        self._public = await asyncio.start_unix_server(self._accept, self.path)
        os.chmod(self.path, 0o666)  # anyone may ask; the kernel says who asked
        log.info("SPIFFE Workload API on unix://%s", self.path)

    async def close(self) -> None:
        if self._public is not None:
            self._public.close()
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        if self._grpc is not None:
            await self._grpc.stop(grace=0.2)
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.private, ignore_errors=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._relays) >= MAX_CONNECTIONS:
            if not self._full:  # once per episode: a caller must not be able to flood the log
                log.warning("Workload API: %d connections held; refusing more until some close", MAX_CONNECTIONS)
            self._full = True
            writer.close()
            return
        self._full = False
        self._relays.add(task)
        sock: socket.socket = writer.get_extra_info("socket")
        name = ""
        pidfd = -1
        inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        inner_writer: asyncio.StreamWriter | None = None
        try:
            pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            pidfd = os.pidfd_open(pid)
            bound = self.private / f"c{next(self._numbers)}"
            inner.bind(str(bound))
            inner.setblocking(False)
            name = f"unix:{bound}"
            self._callers[name] = _Caller(pid, uid, pidfd)
            try:
                await asyncio.get_running_loop().sock_connect(inner, str(self.private / "grpc.sock"))
            finally:
                bound.unlink(missing_ok=True)  # the peer name stays with the socket
            inner_reader, inner_writer = await asyncio.open_unix_connection(sock=inner)
            await asyncio.gather(_pump(reader, inner_writer), _pump(inner_reader, writer))
        except OSError:
            pass  # the caller went away (or was gone before it was attested)
        finally:
            self._callers.pop(name, None)
            if pidfd >= 0:
                os.close(pidfd)
            writer.close()
            if inner_writer is not None:
                inner_writer.close()
            else:
                inner.close()
            self._relays.discard(task)

    # -- who is calling ------------------------------------------------------------------------------------------
    async def _agent(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get(HEADER) != "true":
            await self._abort(method, context, grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        caller = self._callers.get(context.peer())
        if caller is None or not caller.alive():
            await self._abort(method, context, grpc.StatusCode.PERMISSION_DENIED,
                              "no identity issued: the caller has exited")
        assert caller is not None
        try:
            agent_id = self._agent_of_pid(caller.pid)
        except IdmeshError:  # /proc/<pid> is gone
            agent_id = None
        if not caller.alive():  # it exited while its cgroup was read: that cgroup may have been a new process's
            await self._abort(method, context, grpc.StatusCode.PERMISSION_DENIED,
                              "no identity issued: the caller has exited")
        if agent_id is None:
            await self._abort(method, context, grpc.StatusCode.PERMISSION_DENIED,
                              f"no identity issued: process {caller.pid} (uid {caller.uid}) is not an agent")
        assert agent_id is not None
        return agent_id

    async def _abort(self, method: str, context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode,
                     message: str) -> NoReturn:
        self._count(method, code.name)
        await context.abort(code, message)
        raise AssertionError("abort returned")

    async def _refuse(self, method: str, context: grpc.aio.ServicerContext[Any, Any], exc: IdmeshError) -> NoReturn:
        if isinstance(exc, PermissionDenied):
            code = grpc.StatusCode.PERMISSION_DENIED
        elif isinstance(exc, InvalidInput):
            code = grpc.StatusCode.INVALID_ARGUMENT
        else:
            code = grpc.StatusCode.UNAVAILABLE
        await self._abort(method, context, code, str(exc))

    # -- the service ---------------------------------------------------------------------------------------------
    async def FetchX509SVID(self, request: pb.X509SVIDRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[pb.X509SVIDResponse]:
        agent_id = await self._agent("FetchX509SVID", context)
        sent = None
        while True:
            try:
                svid = await self.svids.x509(agent_id)
                if svid is not sent:
                    self._count("FetchX509SVID", "OK")
                    yield pb.X509SVIDResponse(svids=[pb.X509SVID(
                        spiffe_id=svid.spiffe_id, x509_svid=svid.certificate, x509_svid_key=svid.key,
                        bundle=self.svids.bundle)])
                    sent = svid
                await self.svids.changed(agent_id, svid)
            except IdmeshError as exc:
                await self._refuse("FetchX509SVID", context, exc)

    async def FetchX509Bundles(self, request: pb.X509BundlesRequest,
                               context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[pb.X509BundlesResponse]:
        agent_id = await self._agent("FetchX509Bundles", context)
        self._count("FetchX509Bundles", "OK")
        yield pb.X509BundlesResponse(bundles={self.svids.trust_domain: self.svids.bundle})
        await self._until_ended("FetchX509Bundles", agent_id, context)

    async def FetchJWTSVID(self, request: pb.JWTSVIDRequest,
                           context: grpc.aio.ServicerContext[Any, Any]) -> pb.JWTSVIDResponse:
        agent_id = await self._agent("FetchJWTSVID", context)
        own = self.svids.spiffe_id(agent_id)
        if request.spiffe_id and request.spiffe_id != own:
            await self._abort("FetchJWTSVID", context, grpc.StatusCode.PERMISSION_DENIED,
                              f"no identity issued for {request.spiffe_id}")
        try:
            token = await self.svids.jwt(agent_id, tuple(request.audience))
        except IdmeshError as exc:
            await self._refuse("FetchJWTSVID", context, exc)
        self._count("FetchJWTSVID", "OK")
        return pb.JWTSVIDResponse(svids=[pb.JWTSVID(spiffe_id=own, svid=token)])

    async def FetchJWTBundles(self, request: pb.JWTBundlesRequest,
                              context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[pb.JWTBundlesResponse]:
        agent_id = await self._agent("FetchJWTBundles", context)
        sent = None
        while True:
            try:
                keys = await self.svids.jwks()
            except IdmeshError as exc:
                await self._refuse("FetchJWTBundles", context, exc)
            if keys != sent:
                self._count("FetchJWTBundles", "OK")
                yield pb.JWTBundlesResponse(bundles={self.svids.trust_domain: keys})
                sent = keys
            try:
                async with asyncio.timeout(60):
                    await self._until_ended("FetchJWTBundles", agent_id, context)
            except TimeoutError:
                pass

    async def ValidateJWTSVID(self, request: pb.ValidateJWTSVIDRequest,
                              context: grpc.aio.ServicerContext[Any, Any]) -> pb.ValidateJWTSVIDResponse:
        await self._agent("ValidateJWTSVID", context)
        try:
            spiffe_id, claims = await self.svids.validate(request.svid, request.audience)
        except IdmeshError as exc:
            await self._refuse("ValidateJWTSVID", context, exc)
        fields = struct_pb2.Struct()
        fields.update(claims)
        self._count("ValidateJWTSVID", "OK")
        return pb.ValidateJWTSVIDResponse(spiffe_id=spiffe_id, claims=fields)

    async def _until_ended(self, method: str, agent_id: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            await self.svids.until_ended(agent_id)
        except IdmeshError as exc:
            await self._refuse(method, context, exc)
        await self._abort(method, context, grpc.StatusCode.PERMISSION_DENIED,
                          f"no identity issued: agent {agent_id} has ended")


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        if writer.can_write_eof():
            try:
                writer.write_eof()
            except OSError:
                pass
