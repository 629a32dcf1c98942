"""The WireGuard port's side door: STUN in and out of the port WireGuard listens on, without touching WireGuard.

A reflexive address is only worth reporting if it is WireGuard's own NAT
mapping, so STUN must leave from WireGuard's port — which wireguard-go (or
the kernel) holds. As NetBird does, a raw IPv4 socket sends hand-built UDP
datagrams with that source port (the kernel adds the IP header; a UDP
checksum of 0 is allowed over IPv4), and receives a copy of every UDP
datagram arriving for the port. A classic BPF program attached to it lets
through only those whose destination port is WireGuard's and whose payload
carries the STUN magic cookie, so WireGuard's own traffic never reaches
Python (WireGuard gets the STUN copies too, and ignores them).

Needs CAP_NET_RAW (meshd.service grants it). IPv4 only: an IPv6 raw socket
does not see the IP header the filter reads, and the NAT labs are IPv4;
IPv6 endpoints keep working as before, without probing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable

from meshcore.errors import PermissionDenied, Unavailable

__all__ = ["STUN_COOKIE", "WireGuardPort", "stun_filter"]

log = logging.getLogger("meshd.nat")
STUN_COOKIE = 0x2112A442
_SO_ATTACH_FILTER = 26


def stun_filter(port: int) -> list[tuple[int, int, int, int]]:
    """The BPF program: accept UDP to ``port`` whose payload's bytes 4-7 are the STUN cookie; drop the rest.

    Offsets are from the IPv4 header (a raw socket's view): ``x`` = its
    length, then the UDP destination port at x+2, the cookie at x+8+4.
    """
    return [
        (0xB1, 0, 0, 0),              # ldxb 4*([0]&0xf)     x = IPv4 header length
        (0x48, 0, 0, 2),              # ldh [x+2]            UDP destination port
        (0x15, 0, 3, port),           # jeq #port, next, drop
        (0x40, 0, 0, 12),             # ld [x+12]            STUN magic cookie (after the 8-byte UDP header)
        (0x15, 0, 1, STUN_COOKIE),    # jeq #cookie, accept, drop
        (0x06, 0, 0, 0xFFFF),         # accept
        (0x06, 0, 0, 0),              # drop
    ]


def _attach(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> ctypes.Array[ctypes.c_char]:
    raw = b"".join(struct.pack("HBBI", *ins) for ins in program)
    buffer = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    return buffer  # the kernel copied it; kept alive until attached all the same


class WireGuardPort:
    """Send and receive STUN on WireGuard's UDP port (IPv4), on the running event loop.

    ``on_message(payload, (ip, port))`` is called for each STUN datagram that
    arrives for the port. :meth:`open` raises :class:`PermissionDenied` without
    CAP_NET_RAW.
    """

    def __init__(self, port: int, on_message: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.port = port
        self._on_message = on_message
        self._sock: socket.socket | None = None
        self.sent = self.received = 0

    def open(self) -> None:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        except PermissionError as exc:
            raise PermissionDenied("STUN from the WireGuard port needs CAP_NET_RAW (a raw socket)") from exc
        except OSError as exc:
            raise Unavailable(f"cannot open a raw UDP socket: {exc.strerror or exc}") from exc
        try:
            _attach(sock, stun_filter(self.port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise Unavailable(f"cannot filter STUN on the WireGuard port {self.port}: {exc.strerror or exc}") from exc
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                packet, _ = self._sock.recvfrom(2048)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("STUN socket: %s", exc)
                return
            header = (packet[0] & 0x0F) * 4
            if len(packet) < header + 8 + 20:
                continue
            source = str(ipaddress.IPv4Address(packet[12:16]))
            sport, dport = struct.unpack_from("!HH", packet, header)
            if dport != self.port:
                continue
            self.received += 1
            self._on_message(packet[header + 8:], (source, sport))

    def send(self, payload: bytes, destination: tuple[str, int]) -> None:
        """One UDP datagram from WireGuard's port to ``destination`` (IPv4); lost ones are the prober's to retry."""
        if self._sock is None:
            return
        udp = struct.pack("!HHHH", self.port, destination[1], 8 + len(payload), 0) + payload
        try:
            self._sock.sendto(udp, (destination[0], 0))
            self.sent += 1
        except OSError as exc:
            log.debug("STUN to %s:%d not sent: %s", destination[0], destination[1], exc)

    def close(self) -> None:
        if self._sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            except RuntimeError:
                pass
            self._sock.close()
            self._sock = None
