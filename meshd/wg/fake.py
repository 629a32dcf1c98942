"""An in-memory WireGuard device for tests, speaking the real UAPI text.

:class:`FakeUapiServer` interprets ``set=1``/``get=1`` the way wireguard-go
does (``update_only``, ``remove``, ``replace_allowed_ips``, a prefix moving
to the last peer that claims it, host bits masked), so a test exercises the
same client, renderer and parser as production and only the socket is
replaced. It counts how often each peer was touched, which is how tests
prove that an unchanged peer got no operation at all (no session reset),
and it can simulate what the network does (a handshake, a roaming peer).

:meth:`FakeWireGuard.text` prints the device like ``wg showconf``, sorted,
so two devices compare by their text.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from meshcore.names import check_ifname

from .diff import Op, diff_device, peer_changes
from .model import DeviceConfig, DeviceState, PeerConfig, format_endpoint, parse_endpoint
from .uapi import UapiClient, key_from_hex, key_to_hex

__all__ = ["FakeUapiServer", "FakeWireGuard"]


@dataclass
class _FakePeer:
    endpoint: str | None = None
    keepalive: int = 0
    allowed: list[str] = field(default_factory=list)
    handshake: tuple[int, int] = (0, 0)
    rx: int = 0
    tx: int = 0


class FakeUapiServer:
    """The state of one device plus an interpreter for UAPI requests (a :class:`UapiTransport`)."""

    def __init__(self) -> None:
        self.private_key: str | None = None  # hex
        self.listen_port = 0
        self.fwmark = 0
        self.peers: dict[str, _FakePeer] = {}  # hex public key -> peer, in insertion order like a device
        self._owner: dict[str, str] = {}  # prefix -> hex key of the peer holding it (a device's trie)
        self.touched: Counter[str] = Counter()  # base64 public key -> set sections that named it
        self.requests: list[str] = []

    # -- the transport ------------------------------------------------------------------------
    def request(self, message: str) -> str:
        self.requests.append(message)
        lines = [line for line in message.splitlines() if line]
        if lines[:1] == ["get=1"]:
            return self._get() + "errno=0\n\n"
        if lines[:1] == ["set=1"]:
            return f"errno={self._set(lines[1:])}\n\n"
        return "errno=-22\n\n"

    def _get(self) -> str:
        out = []
        if self.private_key:
            out.append(f"private_key={self.private_key}")
        out.append(f"listen_port={self.listen_port}")
        if self.fwmark:
            out.append(f"fwmark={self.fwmark}")
        for key, p in self.peers.items():
            out += [f"public_key={key}", f"endpoint={p.endpoint}" if p.endpoint else "",
                    f"last_handshake_time_sec={p.handshake[0]}", f"last_handshake_time_nsec={p.handshake[1]}",
                    f"rx_bytes={p.rx}", f"tx_bytes={p.tx}", f"persistent_keepalive_interval={p.keepalive}"]
            out += [f"allowed_ip={net}" for net in p.allowed]
        return "".join(line + "\n" for line in out if line)

    def _set(self, lines: list[str]) -> int:
        current: str | None = None  # hex key of the peer section, "" for a skipped (update_only) one
        created = False
        for line in lines:
            key, _, value = line.partition("=")
            if key == "public_key":
                current = value
                self.touched[key_from_hex(value)] += 1
                created = value not in self.peers
                if created:
                    self.peers[value] = _FakePeer()
                continue
            if current is None:
                if key == "private_key":
                    self.private_key = value
                elif key == "listen_port":
                    self.listen_port = int(value)
                elif key == "fwmark":
                    self.fwmark = int(value)
                else:
                    return -22
                continue
            if current == "":
                continue
            peer = self.peers[current]
            if key == "update_only":
                if created:  # like wireguard-go: the section's peer did not exist, so drop it and skip
                    del self.peers[current]
                    current = ""
            elif key == "remove":
                gone = self.peers.pop(current, None)
                for net in gone.allowed if gone else ():
                    self._owner.pop(net, None)
                current = ""
            elif key == "endpoint":
                peer.endpoint = format_endpoint(*parse_endpoint(value))
            elif key == "persistent_keepalive_interval":
                peer.keepalive = int(value)
            elif key == "replace_allowed_ips":
                for net in peer.allowed:
                    self._owner.pop(net, None)
                peer.allowed = []
            elif key == "allowed_ip":
                net = str(ipaddress.ip_network(value, strict=False))
                holder = self._owner.get(net)
                if holder is not None and holder in self.peers:  # a prefix moves to the last peer naming it
                    self.peers[holder].allowed.remove(net)
                self._owner[net] = current
                peer.allowed.append(net)
            else:
                return -22
        return 0

    # -- what the network would do --------------------------------------------------------------
    def handshake(self, public_key: str, when: datetime, rx: int = 148, tx: int = 92) -> None:
        """Pretend a handshake with ``public_key`` completed at ``when`` and some bytes moved."""
        peer = self.peers[key_to_hex(public_key)]
        ts = when.timestamp()
        peer.handshake = (int(ts), round((ts - int(ts)) * 1e9))
        peer.rx += rx
        peer.tx += tx

    def roam(self, public_key: str, endpoint: str) -> None:
        """Pretend ``public_key`` sent an authenticated packet from ``endpoint``."""
        self.peers[key_to_hex(public_key)].endpoint = format_endpoint(*parse_endpoint(endpoint))


class FakeWireGuard:
    """A :class:`~meshd.wg.model.WireGuardDevice` backed by :class:`FakeUapiServer`."""

    def __init__(self, ifname: str = "wg-fake") -> None:
        self.ifname = check_ifname(ifname)
        self.server = FakeUapiServer()
        self._client = UapiClient(ifname, self.server)
        self._last: DeviceConfig | None = None
        self._known: dict[str, PeerConfig] | None = None  # _last's peers after update_peers, by key
        self.last_ops: list[Op] = []
        self.closed = False

    def apply(self, desired: DeviceConfig) -> None:
        if self._known is not None and self._last is not None:  # incremental updates since _last
            self._last = DeviceConfig(self._last.private_key, self._last.listen_port, tuple(self._known.values()),
                                      self._last.fwmark)
        self.last_ops = diff_device(self._client.get(), desired, self._last)
        self._client.set(self.last_ops)
        self._last, self._known = desired, None

    def update_peers(self, upsert: Sequence[PeerConfig], remove: Sequence[str]) -> bool:
        if self._last is None:
            return False
        if self._known is None:
            self._known = {p.public_key: p for p in self._last.peers}
        self.last_ops = list(peer_changes(self._known, upsert, remove))
        self._client.set(self.last_ops)
        for key in remove:
            self._known.pop(key, None)
        for peer in upsert:
            self._known[peer.public_key] = peer
        return True

    def state(self) -> DeviceState:
        return self._client.get()

    def close(self) -> None:
        self.closed = True
        self.server = FakeUapiServer()
        self._client = UapiClient(self.ifname, self.server)
        self._last = self._known = None

    def text(self) -> str:
        """The device like ``wg showconf`` prints it, peers and prefixes sorted."""
        state = self.state()
        out = ["[Interface]"]
        if self.server.private_key:
            out.append(f"PrivateKey = {key_from_hex(self.server.private_key)}")
        out.append(f"ListenPort = {state.listen_port}")
        for peer in sorted(state.peers, key=lambda p: p.public_key):
            out += ["", "[Peer]", f"PublicKey = {peer.public_key}"]
            if peer.allowed_ips:
                nets = sorted(peer.allowed_ips, key=lambda n: (ipaddress.ip_network(n).version, n))
                out.append(f"AllowedIPs = {', '.join(nets)}")
            if peer.endpoint:
                out.append(f"Endpoint = {peer.endpoint}")
            if peer.persistent_keepalive:
                out.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
        return "\n".join(out) + "\n"
