"""From the netmap to what the mesh interface is told: its peers and its link (pure).

The data plane (:mod:`meshd.mesh.dataplane`) calls these on every change
and hands the result to the drivers, which send only the difference to
the kernel or wireguard-go.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from meshcore.wire.stream import PeerNode
from meshd.kernel.netconf import LinkConfig
from meshd.wg import PeerConfig

__all__ = ["KEEPALIVE", "choose_endpoint", "desired_link", "desired_peers", "peer_config"]

# Keep NAT mappings open and let a peer learn our endpoint without waiting
# for traffic (WireGuard's usual 25 s).
KEEPALIVE = 25


def choose_endpoint(peer: PeerNode, discovered: Mapping[str, str | None]) -> str | None:
    """What discovery found (LAN announcements, NAT traversal's checked paths) first, then what the controller says.

    A peer discovered as None has no endpoint yet: NAT traversal is still
    probing it, and a guess would cost a failed handshake (see
    :meth:`meshd.nat.traversal.Traversal.endpoints`). Discovery only proposes
    where to send: the key it is filed under comes from the controller-signed
    netmap, so a fake announcement can at worst point a tunnel at the wrong
    place, where the handshake fails.
    """
    key = peer.wireguard_public_key
    if key in discovered:
        return discovered[key]
    return peer.endpoints[0] if peer.endpoints else None


def peer_config(peer: PeerNode, discovered: Mapping[str, str | None]) -> PeerConfig:
    """One node as a WireGuard peer: allowed its whole block, so an agent's birth changes no tunnel."""
    return PeerConfig(public_key=peer.wireguard_public_key, allowed_ips=peer.blocks,
                      endpoint=choose_endpoint(peer, discovered), persistent_keepalive=KEEPALIVE)


def desired_peers(nodes: Mapping[str, PeerNode], self_name: str,
                  discovered: Mapping[str, str | None]) -> dict[str, PeerConfig]:
    """Every node but this one, by name, as a peer of the mesh interface."""
    return {name: peer_config(peer, discovered) for name, peer in sorted(nodes.items()) if name != self_name}


def desired_link(ifname: str, addresses: tuple[str, ...] | list[str], prefixes: tuple[str, ...] | list[str]) -> LinkConfig:
    """The node's own addresses as host routes' sources, the mesh prefixes routed in."""
    hosts = tuple(f"{a}/{ipaddress.ip_address(a).max_prefixlen}" for a in addresses)
    return LinkConfig(ifname=ifname, addresses=hosts, routes=tuple(prefixes))
