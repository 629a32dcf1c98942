"""Overlay addressing: the mesh prefixes and the block each node owns.

The mesh has one IPv4 prefix (inside 100.64.0.0/10, RFC 6598) and one IPv6
ULA /48 (RFC 4193, chosen at random when the controller is initialised).
Both are cut into equally many blocks; block *i* of a node is the *i*-th
IPv4 block together with the *i*-th IPv6 block. The first host address of a
block is the node's own; the rest is the pool its agents are given
addresses from. Because a WireGuard peer allows a node's whole block, an
agent's birth or death changes no tunnel anywhere.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from .errors import Exhausted, InvalidInput

__all__ = ["CGNAT", "MeshPrefixes", "NodeBlock", "parse_address", "parse_network", "random_ula48"]

CGNAT = IPv4Network("100.64.0.0/10")


def random_ula48() -> IPv6Network:
    """RFC 4193 §3.2: fd00::/8 followed by a 40-bit random Global ID."""
    global_id = secrets.randbits(40)
    return IPv6Network((int(IPv6Address("fd00::")) | (global_id << 80), 48))


@dataclass(frozen=True)
class NodeBlock:
    """Block ``index`` of the mesh: a node's own addresses and its agent pool."""

    index: int
    v4: IPv4Network
    v6: IPv6Network

    @property
    def node_v4(self) -> IPv4Address:
        return self.v4.network_address + 1

    @property
    def node_v6(self) -> IPv6Address:
        return self.v6.network_address + 1

    @property
    def agent_capacity(self) -> int:
        """Agent addresses in the block: all but network, node and broadcast."""
        return self.v4.num_addresses - 3

    def agent_address(self, slot: int) -> tuple[IPv4Address, IPv6Address]:
        """Agent slot ``slot`` (0-based) gets the same offset in both families."""
        if not 0 <= slot < self.agent_capacity:
            raise Exhausted(f"agent slot {slot} is outside block {self.v4} (capacity {self.agent_capacity})")
        return self.v4.network_address + 2 + slot, self.v6.network_address + 2 + slot

    def contains(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return ip in (self.v4 if ip.version == 4 else self.v6)


@dataclass(frozen=True)
class MeshPrefixes:
    """The mesh's two prefixes and the size of a node block in each."""

    v4: IPv4Network
    v6: IPv6Network
    block_v4: int = 26
    block_v6: int = 64

    def __post_init__(self) -> None:
        if not self.v4.subnet_of(CGNAT):
            raise InvalidInput(f"IPv4 prefix {self.v4} must lie inside {CGNAT}")
        if not self.v6.subnet_of(IPv6Network("fc00::/7")):
            raise InvalidInput(f"IPv6 prefix {self.v6} must be a ULA (fc00::/7)")
        if not self.v4.prefixlen < self.block_v4 <= 30:
            raise InvalidInput(f"IPv4 block size /{self.block_v4} must be longer than /{self.v4.prefixlen} and at most /30")
        if not self.v6.prefixlen < self.block_v6 <= 120:
            raise InvalidInput(f"IPv6 block size /{self.block_v6} must be longer than /{self.v6.prefixlen} and at most /120")
        if 128 - self.block_v6 < 32 - self.block_v4:  # agent slots take the same offset in both families
            raise InvalidInput(
                f"IPv6 block size /{self.block_v6} holds fewer addresses than the IPv4 block /{self.block_v4}"
            )

    @property
    def capacity(self) -> int:
        """How many node blocks the mesh holds (the smaller family decides)."""
        return int(min(2 ** (self.block_v4 - self.v4.prefixlen), 2 ** (self.block_v6 - self.v6.prefixlen)))

    def block(self, index: int) -> NodeBlock:
        if not 0 <= index < self.capacity:
            raise Exhausted(f"the mesh has {self.capacity} node blocks; block {index} does not exist")
        v4 = IPv4Network((int(self.v4.network_address) + (index << (32 - self.block_v4)), self.block_v4))
        v6 = IPv6Network((int(self.v6.network_address) + (index << (128 - self.block_v6)), self.block_v6))
        return NodeBlock(index, v4, v6)

    def block_of(self, address: str) -> int | None:
        """The index of the block ``address`` falls in, or None outside the mesh."""
        ip = ipaddress.ip_address(address)
        if isinstance(ip, IPv4Address) and ip in self.v4:
            index = (int(ip) - int(self.v4.network_address)) >> (32 - self.block_v4)
        elif isinstance(ip, IPv6Address) and ip in self.v6:
            index = (int(ip) - int(self.v6.network_address)) >> (128 - self.block_v6)
        else:
            return None
        return int(index) if index < self.capacity else None


def parse_network(text: str, what: str, family: int | None = None) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A prefix without host bits (of ``family`` if given), or InvalidInput naming ``what``."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{what} {text!r} is not a prefix without host bits") from exc
    if family is not None and net.version != family:
        raise InvalidInput(f"{what} {text!r} is not an IPv{family} prefix")
    return net


def parse_address(text: str, what: str, family: int) -> str:
    """An address of ``family`` in canonical text, or InvalidInput naming ``what``."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError as exc:
        raise InvalidInput(f"{what} {text!r} is not an address") from exc
    if address.version != family:
        raise InvalidInput(f"{what} {text!r} is not an IPv{family} address")
    return str(address)
