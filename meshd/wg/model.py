"""The WireGuard driver's vocabulary: desired configuration, observed state, the device protocol.

Desired values are validated and put in canonical form when they are built
(keys checked, networks in their shortest spelling, peers sorted), so two
configs that mean the same thing compare equal and a meaningless one (a host
bit set in an allowed IP, the same prefix on two peers) is refused before it
reaches a device, where WireGuard would silently mask it or move it between
peers.

Keys are base64 strings throughout, as ``wg`` and the netmap spell them;
only the UAPI layer converts them to hex.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import x25519

from meshcore.errors import InvalidInput

__all__ = [
    "DeviceConfig",
    "DeviceState",
    "PeerConfig",
    "PeerState",
    "WireGuardDevice",
    "format_endpoint",
    "generate_private_key",
    "parse_endpoint",
    "public_key_of",
]

def _check_key(key: str, what: str) -> str:
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{what} {key!r} is not base64") from exc
    if len(raw) != 32:
        raise InvalidInput(f"{what} {key!r} is not a 32-byte WireGuard key")
    return base64.b64encode(raw).decode()


def generate_private_key() -> str:
    """A fresh X25519 private key in base64, as ``wg genkey`` prints it."""
    return base64.b64encode(x25519.X25519PrivateKey.generate().private_bytes_raw()).decode()


def public_key_of(private_key: str) -> str:
    """The base64 public key of a base64 private key (``wg pubkey``)."""
    raw = base64.b64decode(_check_key(private_key, "private key"))
    public = x25519.X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    return base64.b64encode(public).decode()


def parse_endpoint(endpoint: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``"ip:port"`` or ``"[v6]:port"``; names are refused because resolving them is the caller's job."""
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not port_text.isdigit():
        raise InvalidInput(f"endpoint {endpoint!r} is not ip:port or [ipv6]:port")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError as exc:
        raise InvalidInput(f"endpoint {endpoint!r} does not start with an IP address") from exc
    if ip.version == 6 and not bracketed:
        raise InvalidInput(f"endpoint {endpoint!r}: write an IPv6 address in brackets, [addr]:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise InvalidInput(f"endpoint {endpoint!r}: port must be 1-65535")
    return ip, port


def format_endpoint(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _canonical_endpoint(endpoint: str) -> str:
    return format_endpoint(*parse_endpoint(endpoint))


def _network_sort_key(net: str) -> tuple[int, int, int]:
    n = ipaddress.ip_network(net)
    return n.version, int(n.network_address), n.prefixlen


def _canonical_networks(values: tuple[str, ...] | list[str], what: str) -> tuple[str, ...]:
    nets = set()
    for value in values:
        try:
            nets.add(str(ipaddress.ip_network(value, strict=True)))
        except ValueError as exc:
            raise InvalidInput(f"{what}: {value!r} is not a network (host bits set, or not an address/prefix)") from exc
    return tuple(sorted(nets, key=_network_sort_key))


@dataclass(frozen=True)
class PeerConfig:
    """One peer as we want it: its key, the prefixes it may source, where to reach it.

    ``endpoint`` None means "no opinion": the device keeps whatever endpoint it
    has learnt from the peer's packets. ``persistent_keepalive`` None means off.
    """

    public_key: str
    allowed_ips: tuple[str, ...] = ()
    endpoint: str | None = None
    persistent_keepalive: int | None = None

    def __post_init__(self) -> None:
        key = _check_key(self.public_key, "peer public key")
        object.__setattr__(self, "public_key", key)
        object.__setattr__(self, "allowed_ips", _canonical_networks(self.allowed_ips, f"peer {key} allowed IP"))
        if self.endpoint is not None:
            object.__setattr__(self, "endpoint", _canonical_endpoint(self.endpoint))
        keepalive = self.persistent_keepalive
        if keepalive is not None and not 0 <= keepalive < 65536:
            raise InvalidInput(f"peer {key}: persistent keepalive {keepalive} must be 0-65535 seconds")
        object.__setattr__(self, "persistent_keepalive", keepalive or None)


@dataclass(frozen=True)
class DeviceConfig:
    """The whole device as we want it. ``listen_port`` 0 lets the device pick (and keep) one.

    A prefix may belong to one peer only: WireGuard would silently move it to
    whichever peer was configured last, so the outcome would depend on order.
    """

    private_key: str
    listen_port: int
    peers: tuple[PeerConfig, ...] = ()
    fwmark: int = 0
    """Mark on the device's own encrypted packets (0 = none): lets policy routing leave them alone."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "private_key", _check_key(self.private_key, "private key"))
        if not 0 <= self.listen_port < 65536:
            raise InvalidInput(f"listen port {self.listen_port} must be 0-65535")
        if not 0 <= self.fwmark < 2**32:
            raise InvalidInput(f"fwmark {self.fwmark} must be a 32-bit value")
        own = public_key_of(self.private_key)
        owner: dict[str, str] = {}
        seen: set[str] = set()
        for peer in self.peers:
            if peer.public_key in seen:
                raise InvalidInput(f"peer {peer.public_key} is listed twice")
            if peer.public_key == own:
                raise InvalidInput(f"peer {peer.public_key} is this device's own key")
            seen.add(peer.public_key)
            for net in peer.allowed_ips:
                if net in owner:
                    raise InvalidInput(f"allowed IP {net} is given to two peers, {owner[net]} and {peer.public_key}")
                owner[net] = peer.public_key
        object.__setattr__(self, "peers", tuple(sorted(self.peers, key=lambda p: p.public_key)))

    @property
    def public_key(self) -> str:
        return public_key_of(self.private_key)


@dataclass(frozen=True)
class PeerState:
    """One peer as the device reports it. ``latest_handshake`` None: never (or not since it was added)."""

    public_key: str
    endpoint: str | None
    latest_handshake: datetime | None
    rx_bytes: int
    tx_bytes: int
    allowed_ips: tuple[str, ...]
    persistent_keepalive: int | None = None


@dataclass(frozen=True)
class DeviceState:
    """The device as it is. The private key is read but only its public half is kept, so state can be shown."""

    ifname: str
    public_key: str | None
    listen_port: int
    peers: tuple[PeerState, ...] = field(default=())
    fwmark: int = 0

    def peer(self, public_key: str) -> PeerState | None:
        return next((p for p in self.peers if p.public_key == public_key), None)


class WireGuardDevice(Protocol):
    """One WireGuard interface that this process owns.

    ``apply`` converges the device to ``desired`` by sending only the
    difference, so the tunnels of unchanged peers keep their sessions; calling
    it again with the same config sends nothing. ``close`` removes the
    interface and stops any helper process.
    """

    ifname: str

    def apply(self, desired: DeviceConfig) -> None: ...

    def update_peers(self, upsert: Sequence[PeerConfig], remove: Sequence[str]) -> bool:
        """Change only these peers; False (nothing sent) when the device's state is unknown."""
        ...

    def state(self) -> DeviceState: ...

    def close(self) -> None: ...
