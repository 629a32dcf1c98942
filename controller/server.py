"""Serving the API over TLS with uvicorn, client certificates included.

uvicorn verifies the client's chain against the mesh CA (CERT_OPTIONAL: a
node that is enrolling has no certificate yet) but does not pass the
certificate to the app. :class:`_ClientCertProtocol` takes it from the TLS
connection once the handshake is done and adds it to every request's scope
under :data:`controller.api.TLS_EXTENSION`.

uvicorn has no timeout for a request's headers, so a client that sends half
of them holds its connection (and a file descriptor) for ever; the protocol
closes a connection whose headers have not all arrived :data:`HEADER_TIMEOUT`
seconds after it opened or its request began, and refuses connections past
:data:`PER_SOURCE` from one address. The TLS handshake before it is bounded
by :data:`TLS_HANDSHAKE_TIMEOUT` (uvicorn does not pass the event loop's
``ssl_handshake_timeout``, 60 s by default, so :class:`_Loop` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from idmesh.metrics import serve_metrics
from meshcore.errors import IdmeshError, InvalidInput, Unavailable

from . import flows, gauges
from .api import TLS_EXTENSION, create_app
from .authority import DataDir
from .context import Context, NatSettings
from .follow import Follower
from .middleware import DEFAULT_MAX_BODY
from .stun import start_stun

__all__ = ["parse_listen", "serve", "server_ssl_context"]


_PR_SET_PDEATHSIG = 1  # prctl(2)
HEADER_TIMEOUT = 10.0
"""Seconds a request's headers may take to arrive, whole."""
PER_SOURCE = 512
"""Connections one address may hold at once (nodes hold one stream and a few calls each)."""
TLS_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a connection may take to finish its TLS handshake (one that sends nothing holds a descriptor)."""


class _Loop(uvloop.Loop):
    """uvloop, with the TLS handshake bounded on every server it creates (uvicorn's included)."""

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.AbstractServer:  # type: ignore[override]
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", TLS_HANDSHAKE_TIMEOUT)
        return await super().create_server(*args, **kwargs)
_open_from: Counter[str] = Counter()


class _ClientCertProtocol(HttpToolsProtocol):
    _source: str | None = None
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if peer else "?"
        if _open_from[source] >= PER_SOURCE:
            logging.getLogger("idmesh.controller").warning("refused a connection from %s: %d already open",
                                                           source, PER_SOURCE)
            transport.abort()
            return
        _open_from[source] += 1
        self._source = source
        self._arm_header_timer()
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        app = self.app

        async def with_cert(scope: dict[str, Any], receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {})[TLS_EXTENSION] = {"client_cert": der}
            await app(scope, receive, send)

        self.app = with_cert

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def on_message_begin(self) -> None:
        self._arm_header_timer()  # a kept-alive connection's next request has the same time for its headers
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        if self._source is not None:
            _open_from[self._source] -= 1
            if not _open_from[self._source]:
                del _open_from[self._source]
            self._source = None
            super().connection_lost(exc)


def server_ssl_context(data: Path) -> ssl.SSLContext:
    dd = DataDir(data)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(dd.server_cert, dd.server_key)
    ctx.load_verify_locations(dd.ca_cert)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"invalid --listen {listen!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True)
class NatOptions:
    """``serve``'s NAT help: STUN (on by default) and a TURN relay (``--relay``)."""

    stun_listen: str | None = ""
    """HOST:PORT for STUN; "" (default): the API's host, port 3478; None: no STUN (``--no-stun``)."""
    relay: str | None = None
    """``turn:HOST:PORT`` of a TURN server sharing ``relay_secret_file``'s secret (coturn ``use-auth-secret``)."""
    relay_secret_file: Path | None = None


def _nat_settings(options: NatOptions, api_host: str, url: str) -> tuple[NatSettings, tuple[str, int] | None]:
    """What nodes are told (the advertised STUN address, the relay and its secret), and where STUN binds."""
    stun_bind = None
    advertised: tuple[str, ...] = ()
    if options.stun_listen is not None:
        host, port = parse_listen(options.stun_listen) if options.stun_listen else (api_host, 3478)
        stun_bind = (host, port)
        public = host if host not in ("0.0.0.0", "::") else (urlsplit(url).hostname or host)
        advertised = (f"{public}:{port}", f"{public}:{port + 1}")
    relay = secret = None
    if options.relay is not None:
        scheme, _, rest = options.relay.partition(":")
        if scheme != "turn" or not rest:
            raise InvalidInput(f"--relay {options.relay!r}: expected turn:HOST:PORT")
        relay_host, relay_port = parse_listen(rest)
        relay = f"{relay_host}:{relay_port}"
        if options.relay_secret_file is None:
            raise InvalidInput("--relay needs --relay-secret-file (coturn's static-auth-secret)")
        try:
            secret = options.relay_secret_file.read_text().strip().encode()
        except OSError as exc:
            raise InvalidInput(f"cannot read --relay-secret-file {options.relay_secret_file}: "
                               f"{exc.strerror or exc}") from exc
        if not secret:
            raise InvalidInput(f"--relay-secret-file {options.relay_secret_file} is empty")
    return NatSettings(stun=advertised, relay=relay, relay_secret=secret), stun_bind


async def _serve_all(ctx: Context, server: uvicorn.Server, sock: socket.socket, follower: Follower,
                     stun_bind: tuple[str, int] | None) -> None:
    ctx.loop = asyncio.get_running_loop()
    transports = await start_stun(*stun_bind) if stun_bind else []
    tasks = [asyncio.create_task(follower.run(), name="follow"), asyncio.create_task(_prune(ctx), name="prune")]
    try:
        await server.serve(sockets=[sock])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for transport, _ in transports:
            transport.close()


async def _prune(ctx: Context) -> None:
    """Flow records past their retention go hourly, whether or not nodes post any."""
    while True:
        try:
            await asyncio.to_thread(flows.prune_flows, ctx, datetime.now(UTC))
        except IdmeshError as exc:
            logging.getLogger("idmesh.controller").warning("cannot prune the flow log: %s", exc)
        await asyncio.sleep(3600)


@dataclass(frozen=True)
class ServeOptions:
    max_body: int = DEFAULT_MAX_BODY
    metrics: str | None = None
    nat: NatOptions | None = None
    svid_ttl: timedelta = timedelta(hours=1)
    flow_retention: timedelta = flows.FLOW_RETENTION
    workers: int = 1


def serve(data: Path, listen: str, options: ServeOptions = ServeOptions(),
          middleware: Sequence[Callable[[Any], Any]] = ()) -> None:
    """Serve the API until SIGTERM; ``middleware`` wraps it in more ASGI layers (the last one outermost).

    With ``workers`` > 1 (a PostgreSQL store only) the listening socket is made first and that many
    processes serve it, each a replica of its own that follows the change log: the kernel spreads the
    connections, and enrollment and agent issuance use every core. The first process supervises the
    others and is the one with STUN and metrics.
    """
    host, port = parse_listen(listen)
    where, _ = DataDir(data).replica()
    if options.workers > 1 and not isinstance(where, str):
        raise InvalidInput("--workers needs a PostgreSQL store (mesh-controller init --db postgresql://...): "
                           "SQLite has one writer")
    try:
        sock = _bind(host, port)
    except OSError as exc:
        raise Unavailable(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    children = [_fork_worker(data, host, sock, options, middleware) for _ in range(options.workers - 1)]
    try:
        _worker(data, host, sock, options, middleware, first=True)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _fork_worker(data: Path, host: str, sock: socket.socket, options: ServeOptions,
                 middleware: Sequence[Callable[[Any], Any]]) -> int:
    """A worker process (before any thread or connection exists in this one: fork copies neither well)."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        # It ends with the first process however that one ends (uvicorn re-raises SIGTERM after its shutdown,
        # which kills the first process before any cleanup of its own could run; kill -9 does too).
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            return os._exit(0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the first process decides when everyone stops
        _worker(data, host, sock, options, middleware, first=False)
    except IdmeshError as exc:
        logging.getLogger("idmesh.controller").error("worker %d: %s", os.getpid(), exc)
        code = 1
    except BaseException:
        logging.getLogger("idmesh.controller").exception("worker %d failed", os.getpid())
        code = 1
    finally:
        os._exit(code)


def _worker(data: Path, host: str, sock: socket.socket, options: ServeOptions,
            middleware: Sequence[Callable[[Any], Any]], first: bool) -> None:
    ctx = Context.open(data)
    try:
        ctx.nat, stun_bind = _nat_settings(options.nat or NatOptions(), host, ctx.settings.url)
        ctx.svid_ttl, ctx.flow_retention = options.svid_ttl, options.flow_retention
        if options.metrics and first:
            gauges.watch(ctx)
            serve_metrics(ctx.metrics, options.metrics)
        ssl_ctx = server_ssl_context(data)
        follower = Follower(ctx)
        app = create_app(ctx, options.max_body, follower.settle)
        for layer in middleware:
            app = layer(app)
        config = uvicorn.Config(
            app,
            http=_ClientCertProtocol,
            ws="none",
            lifespan="off",
            log_level="warning",
            log_config=None,  # its loggers write through ours (idmesh.logs): JSON lines, one per error
            ssl_context_factory=lambda _config, _default: ssl_ctx,
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        if first:
            logging.getLogger("idmesh.controller").info(
                "controller for %s listening on %s (%s, %d worker(s))", ctx.settings.domain, ctx.settings.url,
                ctx.store.description.split(" ", 1)[0], options.workers)
        # uvloop: its TLS and transports are C, about a third of the CPU per enrollment.
        with asyncio.Runner(loop_factory=_Loop) as runner:
            runner.run(_serve_all(ctx, server, sock, follower, stun_bind if first else None))
    finally:
        ctx.store.close()


def _bind(host: str, port: int) -> socket.socket:
    """Bind before serving, so a taken port is our one-line error, not uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
