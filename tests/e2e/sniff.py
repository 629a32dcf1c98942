"""What a TURN server's host sees on the wire: run inside it (``python -m tests.e2e.sniff SECONDS HEX``).

An AF_PACKET socket captures every IPv4 UDP packet on every interface of the
namespace (eth0 and lo: two allocations of one server talk over lo) for
SECONDS, and prints one JSON line: how many IPv4 packets contain the byte
string HEX (a plaintext marker the test sent inside the tunnel), how many UDP payloads there were, how many
of them (after a ChannelData header, if any) are WireGuard messages (type 1-4
followed by three zero bytes). ``ready`` is printed
once the socket is open.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

_ETH_P_ALL = 0x0003
_WIREGUARD_TYPES = {bytes([t, 0, 0, 0]) for t in (1, 2, 3, 4)}


def main(seconds: float, marker: bytes) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    sock.settimeout(0.2)
    print("ready", flush=True)
    counts = {"udp": 0, "wireguard": 0, "channel_data": 0, "marker": 0}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            frame = sock.recv(65535)
        except TimeoutError:
            continue
        if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        if marker in ip:
            counts["marker"] += 1
        header = (ip[0] & 0x0F) * 4
        if ip[9] != 17:
            continue
        (length,) = struct.unpack_from("!H", ip, header + 4)
        payload = ip[header + 8:header + length]
        counts["udp"] += 1
        if len(payload) >= 4 and payload[0] & 0xC0 == 0x40:
            counts["channel_data"] += 1
            payload = payload[4:]
        if payload[:4] in _WIREGUARD_TYPES:
            counts["wireguard"] += 1
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]), bytes.fromhex(sys.argv[2]))
