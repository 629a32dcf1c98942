"""From the netmap to the desired state of this node's interface: pure.

The daemon calls these after every change and hands the result to the
drivers, which send only the difference to the kernel or wireguard-go.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from meshcore.netmap import NodeView, PeerNode

from meshd.mesh.netconf import LinkConfig
from meshd.wg import DeviceConfig, PeerConfig

__all__ = ["desired_device", "desired_link", "choose_endpoint", "KEEPALIVE"]

# Keep NAT mappings open and let a peer learn our endpoint without waiting
# for traffic (WireGuard's usual 25 s).
KEEPALIVE = 25


def choose_endpoint(peer: PeerNode, discovered: Mapping[str, str]) -> str | None:
    """A peer found on the local link first, then what the controller says.

    Discovery only proposes where to send: the key it is filed under comes
    from the controller-signed netmap, so a fake announcement can at worst
    point a tunnel at the wrong place, where the handshake fails.
    """
    local = discovered.get(peer.wireguard_public_key)
    if local:
        return local
    return peer.endpoints[0] if peer.endpoints else None


def desired_device(private_key: str, listen_port: int, view: NodeView, self_name: str,
                   discovered: Mapping[str, str] | None = None) -> DeviceConfig:
    peers = tuple(
        PeerConfig(
            public_key=peer.wireguard_public_key,
            allowed_ips=peer.blocks,  # the whole block: an agent's birth changes no tunnel
            endpoint=choose_endpoint(peer, discovered or {}),
            persistent_keepalive=KEEPALIVE,
        )
        for name, peer in sorted(view.nodes.items())
        if name != self_name
    )
    return DeviceConfig(private_key=private_key, listen_port=listen_port, peers=peers)


def desired_link(ifname: str, addresses: tuple[str, ...] | list[str], prefixes: tuple[str, ...] | list[str]) -> LinkConfig:
    """The node's own addresses as host routes' sources, the mesh prefixes routed in."""
    hosts = tuple(f"{a}/{ipaddress.ip_address(a).max_prefixlen}" for a in addresses)
    return LinkConfig(ifname=ifname, addresses=hosts, routes=tuple(prefixes))
