"""STUN on the controller (RFC 8489 Binding, aioice's codec): a node learns the address its NAT maps it to.

A node sends Binding requests *from its WireGuard port* (meshd.nat), so the
answer names the very mapping WireGuard's packets get. The server listens
on two ports of the same address: a NAT whose mapping depends on the
destination answers the two with different public ports, which tells the
node it is behind a symmetric NAT (only the relay will do) rather than one
a peer can punch through.

Anything that is not a well-formed Binding request is dropped without an
answer (counted): STUN from strangers costs one parse, never an
amplification (the answer is never larger than what a request of the
minimal size could cause, and goes only to the request's source).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import cast

from aioice import stun

from meshcore.errors import Unavailable

__all__ = ["StunServer", "start_stun"]

log = logging.getLogger("idmesh.controller.stun")
SOFTWARE = "idmesh"


@dataclass
class StunServer(asyncio.DatagramProtocol):
    """One UDP socket answering Binding requests with the source address it saw (XOR-MAPPED-ADDRESS)."""

    answered: int = 0
    dropped: int = 0
    transport: asyncio.DatagramTransport | None = field(default=None, repr=False)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # asyncio's own is not a subclass of it

    def datagram_received(self, data: bytes, addr: tuple[str, int] | tuple[str, int, int, int]) -> None:
        try:
            request = stun.parse_message(data)
        except (ValueError, KeyError, IndexError) as exc:
            self.dropped += 1
            log.debug("STUN from %s dropped: %s", addr[0], exc)
            return
        if request.message_method != stun.Method.BINDING or request.message_class != stun.Class.REQUEST:
            self.dropped += 1
            return
        answer = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                              transaction_id=request.transaction_id)
        answer.attributes["XOR-MAPPED-ADDRESS"] = (addr[0], addr[1])
        answer.attributes["SOFTWARE"] = SOFTWARE
        answer.add_fingerprint()
        assert self.transport is not None
        self.transport.sendto(bytes(answer), addr)
        self.answered += 1


async def start_stun(host: str, port: int) -> list[tuple[asyncio.DatagramTransport, StunServer]]:
    """STUN on ``host`` at ``port`` and ``port + 1`` (see the module's docstring); close the transports to stop."""
    loop = asyncio.get_running_loop()
    out: list[tuple[asyncio.DatagramTransport, StunServer]] = []
    for p in (port, port + 1):
        try:
            transport, server = await loop.create_datagram_endpoint(StunServer, local_addr=(host, p))
        except OSError as exc:
            for t, _ in out:
                t.close()
            raise Unavailable(f"cannot listen for STUN on {host}:{p}: {exc.strerror or exc}") from exc
        out.append((transport, server))
    log.info("STUN on udp %s:%d and :%d", host, port, port + 1)
    return out
