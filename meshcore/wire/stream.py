"""The netmap stream: what every node must know about the other nodes, and how it reaches them.

The controller keeps one mesh-wide map with a version number that grows by
one with every change (a node enrolled or removed, an endpoint changed).
A node's stream starts with a full map and continues with deltas; each
delta names the version it applies to (``base``), so a node that missed one
notices and asks for a full resync instead of drifting (applying them is
:class:`meshcore.netmap.NodeView`).

Messages on the stream are one JSON object per line (NDJSON), each a
:class:`StreamMessage`. The node names its protocol in the request that
opens the stream; the controller answers the one both will speak
(:func:`meshcore.wire.negotiate`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from .base import REQUEST_CONFIG, Answer, Request

__all__ = [
    "MESSAGE_TYPES",
    "AgentUpdate",
    "EndpointReport",
    "NatConfig",
    "Netmap",
    "NetmapDelta",
    "PeerNode",
    "PolicyDoc",
    "ProbeAsk",
    "ProbeRequest",
    "Reachability",
    "ReachabilityReport",
    "RelayCredentials",
    "RouteOffer",
    "RouteOfferReport",
    "StreamMessage",
]

MESSAGE_TYPES = ("full", "delta", "keepalive", "policy", "agents", "nat", "probe")
"""The message types of this protocol version; each names the field of :class:`StreamMessage` it sets."""


class RouteOffer(Answer):
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


class Reachability(Answer):
    """How a node behind NAT can be reached, besides its host ``endpoints`` (SPEC §7).

    ``probe_ufrag``/``probe_pwd`` are the node's short-term probe credentials
    (as ICE's): a probe to it is a STUN Binding request whose USERNAME is
    ``<its ufrag>:<sender's ufrag>`` and whose MESSAGE-INTEGRITY is keyed with
    its pwd, so an answer proves the node itself answered, from that address.
    """

    reflexive: tuple[str, ...] = Field(default=(), max_length=8,
                                       description="ip:port the node's NAT maps its WireGuard port to (STUN)")
    relay: str | None = Field(default=None, max_length=64,
                              description="its relayed ip:port at the TURN server; None: no relay")
    nat: str = Field(default="unknown", max_length=16,
                     description="'none' (no NAT seen), 'independent' (same mapping for every destination: "
                     "hole punching works), 'varies' (symmetric: only the relay works), 'unknown'")
    probe_ufrag: str | None = Field(default=None, max_length=64)
    probe_pwd: str | None = Field(default=None, max_length=128)


class PeerNode(Answer):
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
    reach: Reachability = Field(default_factory=Reachability, description="NAT: reflexive and relayed addresses")
    mcp_ports: tuple[int, ...] = Field(default=(), description="ports it serves MCP on (meshctl serve --mcp): "
                                       "senders report processes that are not agents connecting to them")


class Netmap(Answer):
    """The whole mesh at ``version``."""

    version: int
    domain: str
    prefixes: tuple[str, ...] = Field(description="the overlay, IPv4 then IPv6: routed through the mesh interface")
    nodes: dict[str, PeerNode] = Field(description="every node by name, the receiving node included")
    controllers: tuple[str, ...] = Field(default=(), description="every controller replica's URL (SPEC §8): "
                                         "where a node turns when the one it uses stops answering")


class NetmapDelta(Answer):
    """The change from version ``base`` to ``version`` (> base: the mesh's one change sequence also
    numbers policy and agent changes, so versions of deltas need not be consecutive)."""

    base: int
    version: int
    upsert: tuple[PeerNode, ...] = Field(default=(), description="nodes added or changed, whole")
    remove: tuple[str, ...] = Field(default=(), description="names of nodes that left the mesh")
    controllers: tuple[str, ...] | None = Field(default=None, description="the controller URLs, when a "
                                                "replica joined or left (absent: unchanged)")


class PolicyDoc(Answer):
    """The mesh's policy as applied: each node compiles its own filter from it."""

    version: int = Field(description="grows by one with every apply; 0 = no policy yet (deny everything)")
    hash: str = Field(description="SHA-256 of text, hex")
    filename: str = Field(description="the file name it was applied from, for error locations")
    text: str = Field(description="the policy YAML exactly as applied")


class AgentUpdate(Answer):
    """Agent identities for the receiving node to verify and enforce.

    ``full``: replace every agent identity held (sent on connect); else add
    ``certificates`` and drop ``revoked``. Revocations are applied first.
    """

    full: bool = False
    certificates: tuple[str, ...] = Field(default=(), description="PEM agent X509-SVIDs, signed by the mesh CA")
    revoked: tuple[str, ...] = Field(default=(), description="agent ids that no node may honor any more")


class StreamMessage(Answer):
    """One line of the stream. Exactly the field named by ``type`` is set.

    On connect the controller sends the policy first, then the map, then the
    live agent identities, so a node enforces the current policy before it
    learns of any new peer. ``type`` is one of :data:`MESSAGE_TYPES`; a
    reader skips a line whose type it does not know (a newer controller's),
    as it ignores unknown fields.
    """

    type: str = Field(max_length=64)
    full: Netmap | None = None
    delta: NetmapDelta | None = None
    policy: PolicyDoc | None = None
    agents: AgentUpdate | None = None
    nat: NatConfig | None = None
    probe: ProbeRequest | None = None


class RelayCredentials(Answer):
    """Short-lived TURN REST credentials (``use-auth-secret``) for this node alone."""

    server: str = Field(description="host:port of the TURN server (UDP)")
    username: str = Field(description="<expiry unix time>:<node name>")
    password: str = Field(description="base64(HMAC-SHA1(secret, username))")
    expires: int = Field(description="unix time; the controller sends fresh ones before")


class NatConfig(Answer):
    """What a node needs to find its way out of a NAT (message type ``nat``, sent to this node only).

    Sent on connect and again before the relay credentials expire.
    """

    stun: tuple[str, ...] = Field(default=(), description="ip:port of STUN servers; two ports of one server "
                                  "tell whether the node's NAT maps by destination")
    relay: RelayCredentials | None = None


class ProbeRequest(Answer):
    """Call me maybe (message type ``probe``): ``peer`` is probing this node's candidates now; probe its.

    Both ends probing at once is what opens two NATs to each other (hole
    punching). A probe request for a peer the node does not have is ignored.
    """

    peer: str


class RouteOfferReport(RouteOffer):
    """A :class:`RouteOffer` as a node reports it: strict, like every request."""

    model_config = REQUEST_CONFIG


class ReachabilityReport(Reachability):
    """A :class:`Reachability` as a node reports it: strict, like every request."""

    model_config = REQUEST_CONFIG


class EndpointReport(Request):
    """What a node tells the controller about how to reach it."""

    listen_port: int = Field(ge=1, le=65535, strict=True)
    endpoints: tuple[str, ...] = Field(default=(), max_length=32, description="local underlay ip:port candidates")
    routing: RouteOfferReport = Field(default_factory=RouteOfferReport,
                                      description="what the node offers as a gateway")
    reach: ReachabilityReport = Field(default_factory=ReachabilityReport,
                                      description="reflexive and relayed addresses, NAT behaviour, probe credentials")
    mcp_ports: tuple[Annotated[int, Field(ge=1, le=65535, strict=True)], ...] = Field(
        default=(), max_length=64, description="ports it serves MCP on (meshctl serve --mcp)")


class ProbeAsk(Request):
    """``POST /v1/probe``: tell ``peer`` to probe the asking node now (call me maybe)."""

    peer: str = Field(max_length=63)
