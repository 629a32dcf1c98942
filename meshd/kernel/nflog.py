"""Reading packets that nftables logs to an NFLOG group (nfnetlink_log).

nftables' ``log group N prefix "..."`` hands a copy of the packet's head to
any process bound to group N over a netfilter netlink socket. pyroute2 does
not speak this subsystem, so this is the few dozen lines of it we need:
bind a group, ask for the first bytes of each packet, and parse what comes
back into (prefix, family, source, destination, protocol, destination port,
and for a packet sent from this host the uid of its socket).
Per network namespace, like the rules that log.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from meshcore.errors import PermissionDenied, Unavailable

__all__ = ["LoggedPacket", "NflogSocket", "parse_packet_message"]

NETLINK_NETFILTER = 12
_SUBSYS_ULOG = 4
_MSG_PACKET = (_SUBSYS_ULOG << 8) | 0
_MSG_CONFIG = (_SUBSYS_ULOG << 8) | 1
_NLM_F_REQUEST, _NLM_F_ACK = 0x1, 0x4
_NLMSG_ERROR = 2
_CFG_CMD, _CFG_MODE, _CFG_TIMEOUT, _CFG_QTHRESH, _CFG_FLAGS = 1, 2, 4, 5, 6
_CMD_BIND = 1
_COPY_PACKET = 2
_CFG_F_UID = 0x0002
_ATTR_PACKET_HDR, _ATTR_PAYLOAD, _ATTR_PREFIX, _ATTR_UID = 1, 9, 10, 11
_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp"}


@dataclass(frozen=True)
class LoggedPacket:
    prefix: str
    source: str
    destination: str
    protocol: str
    port: int | None
    uid: int | None = None
    """The sending socket's owner, for a packet this host sends (None for one that arrived)."""


def _attributes(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return out


def _parse_ip(payload: bytes) -> tuple[str, str, str, int | None] | None:
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        header = (payload[0] & 0x0F) * 4
        proto = payload[9]
        src, dst = str(ipaddress.IPv4Address(payload[12:16])), str(ipaddress.IPv4Address(payload[16:20]))
    elif version == 6 and len(payload) >= 40:
        header, proto = 40, payload[6]  # extension headers are not followed: ports stay unknown then
        src, dst = str(ipaddress.IPv6Address(payload[8:24])), str(ipaddress.IPv6Address(payload[24:40]))
    else:
        return None
    port = None
    if proto in (6, 17) and len(payload) >= header + 4:
        port = struct.unpack_from("!H", payload, header + 2)[0]
    return src, dst, _PROTOCOLS.get(proto, str(proto)), port


def parse_packet_message(data: bytes) -> list[LoggedPacket]:
    """Every logged packet in one datagram of netlink messages (pure)."""
    out = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        if kind == _MSG_PACKET:
            attrs = _attributes(data[offset + 20 : offset + length])  # after nlmsghdr (16) + nfgenmsg (4)
            ip = _parse_ip(attrs.get(_ATTR_PAYLOAD, b""))
            if ip is not None:
                prefix = attrs.get(_ATTR_PREFIX, b"").rstrip(b"\0").decode(errors="replace")
                uid = attrs.get(_ATTR_UID)
                out.append(LoggedPacket(prefix, *ip, uid=struct.unpack("!I", uid)[0] if uid and len(uid) >= 4 else None))
        offset += (length + 3) & ~3
    return out


class NflogSocket:
    """A socket bound to one NFLOG group of the current network namespace."""

    def __init__(self, group: int, copy_bytes: int = 96) -> None:
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            self._sock.bind((0, 0))
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        except OSError as exc:
            raise Unavailable(f"cannot open a netfilter netlink socket: {exc.strerror or exc}") from exc
        self.group = group
        self._seq = 0
        self._config(struct.pack("=HHB3x", 5, _CFG_CMD, _CMD_BIND))
        self._config(struct.pack("=HH", 10, _CFG_MODE) + struct.pack("!IB", copy_bytes, _COPY_PACKET) + b"\0\0\0")
        # The kernel batches log messages for up to a second by default; a flow must be
        # attributed while its sender still holds the address, so deliver each at once.
        self._config(struct.pack("=HH", 8, _CFG_QTHRESH) + struct.pack("!I", 1))
        self._config(struct.pack("=HH", 8, _CFG_TIMEOUT) + struct.pack("!I", 0))
        # and with the sending socket's uid, for the packets this host sends (shadow MCP names the local user)
        self._config(struct.pack("=HH", 6, _CFG_FLAGS) + struct.pack("!H", _CFG_F_UID) + b"\0\0")

    def _config(self, attribute: bytes) -> None:
        self._seq += 1
        body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(self.group)) + attribute
        self._sock.send(struct.pack("=IHHII", 16 + len(body), _MSG_CONFIG, _NLM_F_REQUEST | _NLM_F_ACK, self._seq, 0)
                        + body)
        answer = self._sock.recv(4096)
        _length, kind = struct.unpack_from("=IH", answer, 0)
        if kind == _NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", answer, 16)
            if code:
                cls = PermissionDenied if -code == 1 else Unavailable
                raise cls(f"cannot bind NFLOG group {self.group}: {os.strerror(-code)}")

    def receive(self, timeout: float | None = None) -> list[LoggedPacket]:
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            return []
        except OSError as exc:
            raise Unavailable(f"reading NFLOG group {self.group}: {exc.strerror or exc}") from exc
        return parse_packet_message(data)

    def close(self) -> None:
        self._sock.close()
