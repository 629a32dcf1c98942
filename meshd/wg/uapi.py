"""The WireGuard cross-platform UAPI: text in, text out, over a transport.

Grammar (https://www.wireguard.com/xplatform/): a request is ``get=1`` or
``set=1`` followed by ``key=value`` lines and an empty line; the answer is
``key=value`` lines ending with ``errno=N`` and an empty line. Keys travel in
hex. In a set, ``public_key=`` opens a peer section and the lines after it
apply to that peer.

Rendering and parsing are pure functions; the transport is injected so the
fake device and the tests use the very same client as wireguard-go does.
wireguard-go applies a set line by line, not atomically: a refused line
leaves the lines before it applied. The driver therefore forgets what it
believed was applied after an error and diffs against the device next time.
"""

from __future__ import annotations

import base64
import errno as errno_codes
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from meshcore.errors import InvalidInput, Unavailable

from .diff import AddPeer, Op, RemovePeer, SetDevice, UpdatePeer
from .model import DeviceState, PeerState, public_key_of

__all__ = [
    "UAPI_DIR",
    "UapiClient",
    "UapiTransport",
    "UnixSocketTransport",
    "key_from_hex",
    "key_to_hex",
    "parse_get",
    "render_set",
]

UAPI_DIR = Path("/var/run/wireguard")


def key_to_hex(key: str) -> str:
    return base64.b64decode(key).hex()


def key_from_hex(value: str) -> str:
    return base64.b64encode(bytes.fromhex(value)).decode()


def _peer_lines(op: AddPeer | UpdatePeer | RemovePeer) -> list[str]:
    if isinstance(op, RemovePeer):
        return [f"public_key={key_to_hex(op.public_key)}", "remove=true"]
    if isinstance(op, AddPeer):
        peer = op.peer
        lines = [f"public_key={key_to_hex(peer.public_key)}"]
        if peer.endpoint is not None:
            lines.append(f"endpoint={peer.endpoint}")
        if peer.persistent_keepalive:
            lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={net}" for net in peer.allowed_ips)
        return lines
    lines = [f"public_key={key_to_hex(op.public_key)}", "update_only=true"]
    if op.endpoint is not None:
        lines.append(f"endpoint={op.endpoint}")
    if op.persistent_keepalive is not None:
        lines.append(f"persistent_keepalive_interval={op.persistent_keepalive}")
    if op.allowed_ips is not None:
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={net}" for net in op.allowed_ips)
    return lines


def render_set(ops: Sequence[Op]) -> str:
    """One ``set=1`` request carrying all ``ops``; device-level lines must precede the first peer."""
    lines = ["set=1"]
    for op in ops:
        if isinstance(op, SetDevice):
            if any(line.startswith("public_key=") for line in lines):
                raise ValueError("SetDevice must come before peer operations")
            if op.private_key is not None:
                lines.append(f"private_key={key_to_hex(op.private_key)}")
            if op.listen_port is not None:
                lines.append(f"listen_port={op.listen_port}")
            if op.fwmark is not None:
                lines.append(f"fwmark={op.fwmark}")
        else:
            lines.extend(_peer_lines(op))
    return "\n".join(lines) + "\n\n"


def _pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for line in text.splitlines():
        if line:
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"malformed UAPI line {line!r}")
            pairs.append((key, value))
    return pairs


def answer_errno(text: str) -> int:
    """The ``errno`` of an answer; a missing one counts as an I/O error (the peer hung up mid-answer)."""
    for key, value in reversed(_pairs(text)):
        if key == "errno":
            return int(value)
    return -errno_codes.EIO


def _handshake(sec: int, nsec: int) -> datetime | None:
    if sec == 0 and nsec == 0:
        return None
    return datetime.fromtimestamp(sec + nsec / 1e9, tz=UTC)


@dataclass
class _PeerFields:
    """A peer section of a ``get`` answer while it is being read."""

    public_key: str
    endpoint: str | None = None
    sec: int = 0
    nsec: int = 0
    rx: int = 0
    tx: int = 0
    keepalive: int = 0
    allowed: list[str] = field(default_factory=list)

    def read(self, key: str, value: str) -> None:
        if key == "endpoint":
            self.endpoint = value or None
        elif key == "allowed_ip":
            self.allowed.append(value)
        elif key in _PEER_INTS:
            setattr(self, _PEER_INTS[key], int(value))

    def state(self) -> PeerState:
        return PeerState(self.public_key, self.endpoint, _handshake(self.sec, self.nsec), self.rx, self.tx,
                         tuple(self.allowed), self.keepalive or None)


_PEER_INTS = {"last_handshake_time_sec": "sec", "last_handshake_time_nsec": "nsec", "rx_bytes": "rx",
              "tx_bytes": "tx", "persistent_keepalive_interval": "keepalive"}


def parse_get(text: str, ifname: str) -> DeviceState:
    """Parse a ``get=1`` answer. Keys come back in hex and are returned in base64."""
    public_key: str | None = None
    listen_port = fwmark = 0
    peers: list[_PeerFields] = []
    for key, value in _pairs(text):
        if key == "public_key":
            peers.append(_PeerFields(key_from_hex(value)))
        elif peers:
            peers[-1].read(key, value)
        elif key == "private_key" and int(value, 16):
            public_key = public_key_of(key_from_hex(value))
        elif key == "listen_port":
            listen_port = int(value)
        elif key == "fwmark":
            fwmark = int(value)
    return DeviceState(ifname, public_key, listen_port, tuple(p.state() for p in peers), fwmark)


class UapiTransport(Protocol):
    """Send one request, return the whole answer (up to and including its empty last line)."""

    def request(self, message: str) -> str: ...


class UnixSocketTransport:
    """One connection per request to wireguard-go's socket, so a restarted daemon is picked up for free."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    def request(self, message: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(os.fspath(self.path))
            sock.sendall(message.encode())
            chunks = b""
            while not chunks.endswith(b"\n\n"):
                data = sock.recv(65536)
                if not data:
                    break
                chunks += data
        return chunks.decode()


class UapiClient:
    """get/set over a transport, with errors mapped to idmesh errors naming the interface."""

    def __init__(self, ifname: str, transport: UapiTransport) -> None:
        self.ifname = ifname
        self.transport = transport

    def _request(self, message: str) -> str:
        try:
            answer = self.transport.request(message)
        except OSError as exc:
            raise Unavailable(f"WireGuard interface {self.ifname}: UAPI socket not answering ({exc})") from exc
        code = answer_errno(answer)
        if code == 0:
            return answer
        name = errno_codes.errorcode.get(-code, str(code))
        if -code == errno_codes.EINVAL:
            raise InvalidInput(f"WireGuard interface {self.ifname} refused the configuration ({name})")
        raise Unavailable(f"WireGuard interface {self.ifname}: UAPI request failed ({name})")

    def get(self) -> DeviceState:
        return parse_get(self._request("get=1\n\n"), self.ifname)

    def set(self, ops: Sequence[Op]) -> None:
        if ops:
            self._request(render_set(ops))
