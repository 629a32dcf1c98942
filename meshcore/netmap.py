"""The netmap: what every node must know about the other nodes, and how it
travels from the controller to the nodes.

The controller keeps one mesh-wide map with a version number that grows by
one with every change (a node enrolled or removed, an endpoint changed).
A node's stream starts with a full map and continues with deltas; each
delta names the version it applies to (``base``), so a node that missed one
notices and asks for a full resync instead of drifting. Applying a delta is
pure (:class:`NodeView`): its cost depends on the size of the delta, not of
the mesh.

Messages on the stream are one JSON object per line (NDJSON), each a
:class:`StreamMessage`.

Protocol version history:
  1 (2026-11-28): full maps, deltas, keepalives, policy documents.
  2 (2026-11-28): route offers (``PeerNode.routing``, ``EndpointReport.routing``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "NETMAP_PROTOCOL",
    "PeerNode",
    "Netmap",
    "NetmapDelta",
    "StreamMessage",
    "PolicyDoc",
    "AgentUpdate",
    "ResyncNeeded",
    "NodeView",
    "EndpointReport",
    "RouteOffer",
]

NETMAP_PROTOCOL = 2


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouteOffer(_Wire):
    """What a node offers as a gateway, and the key of its route tunnels.

    Routes reach a gateway over tunnels of their own (one WireGuard
    interface per gateway on the sender, one gateway interface on the
    gateway), because WireGuard picks a peer by destination: the mesh
    interface can send ``0.0.0.0/0`` to one peer only, yet two identities on
    one node may need two different exits.
    """

    routes: tuple[str, ...] = Field(
        default=(), max_length=64,
        description="advertised prefixes, canonical; 0.0.0.0/0 and ::/0 make the node an exit node")
    route_key: str | None = Field(
        default=None, description="base64 X25519 public key of the node's route tunnels (both directions)")
    gateway_port: int | None = Field(
        default=None, ge=1, le=65535, description="UDP port of the gateway interface; None = offers nothing")


class PeerNode(_Wire):
    """One node as the others see it."""

    name: str = Field(description="node name, unique in the mesh")
    wireguard_public_key: str = Field(description="base64 X25519 key; identifies the tunnel peer")
    addresses: tuple[str, ...] = Field(description="the node's own overlay addresses, IPv4 then IPv6")
    blocks: tuple[str, ...] = Field(description="the node's blocks (itself + its agents); a peer's allowed IPs")
    endpoints: tuple[str, ...] = Field(
        default=(), description="underlay ip:port candidates, best first; empty = not known yet (keep what works)"
    )
    owner: str | None = Field(default=None, description="owning principal; None for a tagged node")
    tags: tuple[str, ...] = ()
    routing: RouteOffer = Field(default_factory=RouteOffer, description="routes offered; its route tunnel key")


class Netmap(_Wire):
    """The whole mesh at ``version``."""

    version: int
    domain: str
    prefixes: tuple[str, ...] = Field(description="the overlay, IPv4 then IPv6: routed through the mesh interface")
    nodes: dict[str, PeerNode] = Field(description="every node by name, the receiving node included")


class NetmapDelta(_Wire):
    """The change from version ``base`` to ``version`` (= base + 1)."""

    base: int
    version: int
    upsert: tuple[PeerNode, ...] = Field(default=(), description="nodes added or changed, whole")
    remove: tuple[str, ...] = Field(default=(), description="names of nodes that left the mesh")


class PolicyDoc(_Wire):
    """The mesh's policy as applied: each node compiles its own filter from it."""

    version: int = Field(description="grows by one with every apply; 0 = no policy yet (deny everything)")
    hash: str = Field(description="SHA-256 of text, hex")
    filename: str = Field(description="the file name it was applied from, for error locations")
    text: str = Field(description="the policy YAML exactly as applied")


class AgentUpdate(_Wire):
    """Agent identities for the receiving node to verify and enforce.

    ``full``: replace every agent identity held (sent on connect); else add
    ``certificates`` and drop ``revoked``. Revocations are applied first.
    """

    full: bool = False
    certificates: tuple[str, ...] = Field(default=(), description="PEM agent X509-SVIDs, signed by the mesh CA")
    revoked: tuple[str, ...] = Field(default=(), description="agent ids that no node may honor any more")


class StreamMessage(_Wire):
    """One line of the stream. Exactly the field named by ``type`` is set.

    On connect the controller sends the policy first, then the map, then the
    live agent identities, so a node enforces the current policy before it
    learns of any new peer.
    """

    type: Literal["full", "delta", "keepalive", "policy", "agents"]
    full: Netmap | None = None
    delta: NetmapDelta | None = None
    policy: PolicyDoc | None = None
    agents: AgentUpdate | None = None


class EndpointReport(_Wire):
    """What a node tells the controller about how to reach it."""

    listen_port: int = Field(ge=1, le=65535)
    endpoints: tuple[str, ...] = Field(default=(), max_length=32, description="local underlay ip:port candidates")
    routing: RouteOffer = Field(default_factory=RouteOffer, description="what the node offers as a gateway")


class ResyncNeeded(Exception):
    """A delta does not follow the map it was given: fetch a full map."""


class NodeView:
    """A node's live copy of the netmap, changed in place by each delta.

    In place, because the cost of a delta must not grow with the mesh: a
    10,000-node map is never copied to change one entry.
    """

    def __init__(self, full: Netmap) -> None:
        self.version = full.version
        self.domain = full.domain
        self.prefixes = full.prefixes
        self.nodes: dict[str, PeerNode] = dict(full.nodes)

    def apply(self, delta: NetmapDelta) -> tuple[list[PeerNode], list[str]]:
        """Apply ``delta``; return (nodes added or changed, names removed).

        Raises :class:`ResyncNeeded` on a version gap, leaving the view as it was.
        """
        if delta.version <= self.version:
            return [], []  # already contained in the full map this view started from
        if delta.base != self.version:
            raise ResyncNeeded(f"delta {delta.base}->{delta.version} does not follow version {self.version}")
        removed = [name for name in delta.remove if self.nodes.pop(name, None) is not None]
        changed = [n for n in delta.upsert if self.nodes.get(n.name) != n]
        for node in changed:
            self.nodes[node.name] = node
        self.version = delta.version
        return changed, removed

    def snapshot(self) -> Netmap:
        return Netmap(version=self.version, domain=self.domain, prefixes=self.prefixes, nodes=dict(self.nodes))
