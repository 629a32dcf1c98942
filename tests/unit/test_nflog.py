"""Parsing what nfnetlink_log delivers: prefix, addresses, protocol, port."""

from __future__ import annotations

import ipaddress
import struct

from meshd.kernel.nflog import LoggedPacket, parse_packet_message


def attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def message(prefix: str, payload: bytes, uid: int | None = None) -> bytes:
    body = struct.pack("=BBH", 2, 0, 0) + attr(10, prefix.encode() + b"\0") + attr(9, payload)
    if uid is not None:
        body += attr(11, struct.pack("!I", uid))
    return struct.pack("=IHHII", 16 + len(body), (4 << 8) | 0, 0, 0, 0) + body


def ipv4_tcp(src: str, dst: str, port: int) -> bytes:
    header = bytes([0x45, 0]) + struct.pack("!HHHBBH", 40, 0, 0, 64, 6, 0)
    header += ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
    return header + struct.pack("!HH", 40000, port) + b"\0" * 16


def ipv6_udp(src: str, dst: str, port: int) -> bytes:
    header = struct.pack("!IHBB", 6 << 28, 8, 17, 64)
    header += ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
    return header + struct.pack("!HH", 5353, port) + b"\0" * 4


def test_one_datagram_can_carry_several_logged_packets() -> None:
    data = (message("deny", ipv4_tcp("100.64.0.66", "100.64.0.1", 5432))
            + message("a3", ipv6_udp("fd00::2", "fd00:0:0:1::1", 53)))
    assert parse_packet_message(data) == [
        LoggedPacket("deny", "100.64.0.66", "100.64.0.1", "tcp", 5432),
        LoggedPacket("a3", "fd00::2", "fd00:0:0:1::1", "udp", 53),
    ]


def test_a_packet_this_host_sends_carries_its_sockets_uid() -> None:
    data = message("mcp", ipv4_tcp("100.64.0.1", "100.64.0.65", 8080), uid=65534)
    assert parse_packet_message(data) == [LoggedPacket("mcp", "100.64.0.1", "100.64.0.65", "tcp", 8080, uid=65534)]


def test_truncated_or_foreign_messages_are_skipped_not_fatal() -> None:
    good = message("deny", ipv4_tcp("100.64.0.66", "100.64.0.1", 22))
    assert parse_packet_message(good[:10]) == []
    ack = struct.pack("=IHHII", 20, 2, 0, 0, 0) + struct.pack("=i", 0)
    assert parse_packet_message(ack + good) == [LoggedPacket("deny", "100.64.0.66", "100.64.0.1", "tcp", 22)]
    icmp = bytearray(ipv4_tcp("100.64.0.66", "100.64.0.1", 0))
    icmp[9] = 1
    assert parse_packet_message(message("deny", bytes(icmp)))[0].port is None
