"""The served ports' listeners: one uvicorn server per port on the node's overlay addresses.

HTTP parsing is h11's, through uvicorn, never ours: h11 because it bounds
a request head still arriving (:data:`MAX_HEAD`, a 400 beyond) where
httptools does not; a head that arrives whole in one read is measured by
the proxy (a 431).
uvicorn has no deadline for the head itself (data resets its keep-alive
timer), so :class:`_GuardedH11` closes a connection whose request head has
not arrived :data:`HEAD_TIMEOUT` after its first byte: a slowloris client
holds one socket for that long, not forever. The body's deadline is the
proxy's (:data:`meshd.serve.proxy.BODY_TIMEOUT`).

The sockets bind the node's own overlay addresses with ``IP_FREEBIND``, so a
serve starts before the interface has its addresses; only the mesh reaches
them (and the node itself). The policy's connection-level filter admits the
port; the proxy then decides each request.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from meshcore.errors import Conflict
from meshd.node.localapi import EmbeddedServer
from meshd.serve.entries import ServeEntry
from meshd.serve.proxy import MAX_HEAD, ServeContext, ServeProxy

__all__ = ["HEAD_TIMEOUT", "MAX_HEAD", "Listener"]

log = logging.getLogger("meshd.serve")
HEAD_TIMEOUT = 10.0
IP_FREEBIND = 15


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head (module docstring)."""

    _head_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a head is still arriving
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_late)
        elif self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._head_timer is not None and self.conn.their_state is not h11.IDLE:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _head_late(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("serve: a request head from %s did not arrive in %.0f s; connection closed",
                     self.client[0] if self.client else "?", HEAD_TIMEOUT)
            self.transport.close()


def _bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it each answer's
    # body waits for the client's delayed ACK of its head (40 ms a request, measured)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)  # IPv6 sockets read it too
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(512)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise Conflict(f"cannot serve port {port} on {address}: {exc.strerror or exc}") from exc
    return sock


class Listener:
    """One served port: its sockets, its uvicorn server and its proxy, from :meth:`start` to :meth:`stop`."""

    def __init__(self, entry: ServeEntry, addresses: tuple[str, ...], ctx: ServeContext) -> None:
        self.entry = entry
        self.proxy = ServeProxy(entry, ctx)
        config = uvicorn.Config(self.proxy, http=_GuardedH11, lifespan="off", ws="none", log_config=None,
                                log_level="warning", access_log=False, proxy_headers=False, server_header=False,
                                timeout_keep_alive=5, h11_max_incomplete_event_size=MAX_HEAD,
                                timeout_graceful_shutdown=2)
        self._server = EmbeddedServer(config)
        self._sockets = [_bind(a, entry.port) for a in addresses]
        self._task: asyncio.Task[Any] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=self._sockets),
                                                            name=f"serve-{self.entry.port}")

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            try:
                await self._task
            except Exception:  # a server that failed is stopped all the same
                log.exception("serve %d: the listener ended with an error", self.entry.port)
        for sock in self._sockets:
            sock.close()
        await self.proxy.close()
