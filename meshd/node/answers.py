"""What the daemon tells: its status (``meshctl status``) and its metrics, read from the subsystems.

Both are read while the event loop changes the state they read (status on
the loop, metrics in the metrics server's thread), so each takes one
reference per subsystem up front. Neither waits for the data plane: an
apply may take seconds at scale, and ``meshctl status`` must answer at once.
The WireGuard device is read on its own (each driver serialises its own
conversations), routing reads what its last apply published; a scrape sees
each piece consistent, if not the very latest netmap.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

from meshcore.wire.local import PeerStatus, Status
from meshd.agents.net import AgentNet
from meshd.agents.supervisor import AgentSupervisor
from meshd.mesh.dataplane import DataPlane
from meshd.mesh.firewall import NftFirewall
from meshd.mesh.flowlog import FlowLog
from meshd.nat.traversal import Traversal
from meshd.node.session import ControllerSession
from meshd.node.state import NodeRecord
from meshd.node.view import MeshView
from meshd.routes.routing import Routing
from meshd.settings import Settings
from meshd.wg import DeviceState

__all__ = ["Gauge", "Node", "gauges", "status"]

Gauge = tuple[str, str, dict[str, str], float]
"""A metric sample: name, help, labels, value."""


class Node(Protocol):
    """The subsystems of a running meshd, as the daemon holds them (None: not started yet)."""

    settings: Settings
    record: NodeRecord
    mesh: MeshView
    session: ControllerSession
    firewall: NftFirewall
    plane: DataPlane | None
    agentnet: AgentNet | None
    supervisor: AgentSupervisor | None
    flowlog: FlowLog | None
    routing: Routing | None
    nat: Traversal


def _device(plane: DataPlane | None) -> DeviceState | None:
    return plane.device.state() if plane is not None else None


def status(node: Node) -> Status:
    mesh, plane, record = node.mesh, node.plane, node.record
    view, state = mesh.view, _device(plane)
    by_key = {p.public_key: p for p in state.peers} if state else {}
    peers: list[PeerStatus] = []
    for name, peer in sorted((view.nodes if view else {}).items()):  # sorted copies it in one step
        if name == record.name:
            continue
        ps = by_key.get(peer.wireguard_public_key)
        way = node.nat.status(peer.wireguard_public_key)
        peers.append({
            "name": name,
            "addresses": list(peer.addresses),
            "endpoint": ps.endpoint if ps else None,
            "latest_handshake": ps.latest_handshake.isoformat() if ps and ps.latest_handshake else None,
            "rx_bytes": ps.rx_bytes if ps else 0,
            "tx_bytes": ps.tx_bytes if ps else 0,
            "tags": list(peer.tags),
            "owner": peer.owner,
            "path": way["path"],
            "last_probe": way["last_probe"],
            "nat": peer.reach.nat,
        })
    nf = plane.filter if plane else None
    doc = mesh.policy_doc
    return {
        "self": {
            "name": record.name,
            "addresses": list(record.addresses),
            "public_key": record.wireguard_public_key,
            "tags": list(record.tags),
            "owner": record.owner,
            "interface": node.settings.interface,
            "listen_port": state.listen_port if state else node.settings.listen_port,
        },
        "policy": {
            "version": doc.version if doc else 0,
            "hash": doc.hash if doc else None,
            "ruleset": nf.digest if nf else None,
            "rules": len(nf.rules) if nf else 0,
        },
        "agents": {"honored": len(mesh.book.agents),
                   "local": len(node.supervisor.local) if node.supervisor else 0},
        "controller": {
            "url": node.session.url,
            "urls": list(node.session.urls),
            "connected": node.session.connected,
            "protocol": node.session.protocol,
            "netmap_version": view.version if view else None,
            "applied_version": mesh.applied_version,
            "last_error": node.session.last_error,
            "clock_offset_seconds": node.session.clock_offset,
        },
        "peers": peers,
        "routing": node.routing.status() if node.routing else None,
    }


def gauges(node: Node) -> list[Gauge]:
    """Read at scrape time (in the metrics server's thread) from the daemon's own state."""
    mesh, plane = node.mesh, node.plane
    view, doc = mesh.view, mesh.policy_doc
    out: list[Gauge] = [
        ("idmesh_netmap_version", "Netmap version received", {}, float(view.version if view else 0)),
        ("idmesh_netmap_applied_version", "Netmap version applied to the interface", {},
         float(mesh.applied_version or 0)),
        ("idmesh_policy_version", "Policy version enforced (0: none)", {}, float(doc.version if doc else 0)),
        ("idmesh_controller_connected", "1 while the netmap stream is open", {}, float(node.session.connected)),
        ("idmesh_identities_live", "Identities this node honors, by kind", {"kind": "agent"},
         float(len(mesh.book.agents))),
        ("idmesh_identities_live", "Identities this node honors, by kind", {"kind": "node"},
         float(len(view.nodes) if view else 0)),
        ("idmesh_agents_local", "Agents running on this node", {},
         float(len(node.supervisor.local) if node.supervisor else 0)),
        ("idmesh_denied_packets", "Packets dropped by default deny on mesh ingress", {},
         float(node.firewall.denied())),
    ]
    if node.flowlog is not None:
        for cls in ("agent", "node", "unknown"):
            out.append(("idmesh_denied_flows", "Denied connections logged (rate-limited), by identity class",
                        {"class": cls}, float(node.flowlog.denied[cls])))
    if node.agentnet is not None:
        out.append(("idmesh_spoofed_packets", "Packets dropped for sending with an agent address not theirs",
                    {}, float(node.agentnet.spoofed())))
    for kind, count in node.nat.paths().items():
        out.append(("idmesh_peers_by_path", "Peers by the way this node reaches them", {"path": kind}, float(count)))
    out.append(("idmesh_nat_probes_dropped", "STUN and probes dropped: strangers, malformed, unknown peers", {},
                float(node.nat.dropped)))
    sent, received = node.nat.relay_bytes()
    for direction, count in (("sent", sent), ("received", received)):
        out.append(("idmesh_relay_bytes", "WireGuard bytes through the TURN relay", {"direction": direction},
                    float(count)))
    state = _device(plane)
    if state is not None:
        now = datetime.now(UTC)
        names = {n.wireguard_public_key: name for name, n in (tuple(view.nodes.items()) if view else ())}
        out.append(("idmesh_peers", "WireGuard peers configured", {}, float(len(state.peers))))
        for p in state.peers:
            age = (now - p.latest_handshake).total_seconds() if p.latest_handshake else -1.0
            out.append(("idmesh_handshake_age_seconds", "Seconds since the last handshake (-1: never)",
                        {"peer": names.get(p.public_key, p.public_key[:8])}, age))
    return out
