"""The node's data plane, converged incrementally: WireGuard peers,
addresses and routes, and the firewall compiled from policy and identities.

Events arrive on the event loop (a delta, an agent born, a policy); they
only *record* what changed. :meth:`DataPlane.take` then snapshots that
work on the loop, and :meth:`DataPlane.apply` carries it out in a worker
thread (the drivers block). The cost of a change follows the change: a
node joining sends one WireGuard operation and updates one identity; only
a full map (connect, resync, restart) touches everything.

Order within one apply: the firewall first, then the tunnels, so a new
peer is never reachable under an old policy.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from meshcore.policy import (
    Actor,
    AgentIdentity,
    Change,
    Identities,
    NodeFilter,
    NodeIdentity,
    Policy,
    apply_delta,
    compile_node_filter,
    identity_delta,
)
from meshcore.wire.stream import PeerNode
from meshd.kernel.netconf import NetConf
from meshd.mesh.firewall import NftFirewall
from meshd.mesh.peers import desired_link, desired_peers, peer_config
from meshd.wg import DeviceConfig, PeerConfig, WireGuardDevice

__all__ = ["DataPlane", "RouteApplier", "Work"]

log = logging.getLogger("meshd.mesh.dataplane")


def node_identity(peer: PeerNode) -> NodeIdentity:
    return NodeIdentity(name=peer.name, owner=peer.owner, tags=frozenset(peer.tags), ipv4=peer.addresses[0],
                        ipv6=peer.addresses[1])


class RouteApplier(Protocol):
    """Identity-based routes (:class:`meshd.routes.routing.Routing`), applied after the mesh tunnels: route
    tunnels need the gateways' endpoints."""

    def apply(self, policy: Policy, identities: Identities, nodes: Mapping[str, PeerNode]) -> object: ...


@dataclass
class Work:
    """One apply's worth of changes, snapshotted on the event loop."""

    policy: Policy
    full_nodes: dict[str, PeerNode] | None = None  # everything (and the agents below are all of them)
    nodes: dict[str, PeerNode | None] = field(default_factory=dict)  # changed: new value, or None = removed
    full_agents: list[AgentIdentity] | None = None
    agents: dict[str, AgentIdentity | None] = field(default_factory=dict)
    discovered: dict[str, str | None] = field(default_factory=dict)
    prefixes: tuple[str, ...] = ()
    served: frozenset[int] = frozenset()


class DataPlane:
    def __init__(self, name: str, addresses: tuple[str, str], private_key: str, listen_port: int, ifname: str,
                 device: WireGuardDevice, netconf: NetConf, firewall: NftFirewall, fwmark: int = 0) -> None:
        self.name = name
        self.self_node = NodeIdentity(name=name, ipv4=addresses[0], ipv6=addresses[1])
        self.addresses = addresses
        self.private_key = private_key
        self.listen_port = listen_port
        self.ifname = ifname
        self.device = device
        self.netconf = netconf
        self.firewall = firewall
        self.fwmark = fwmark  # on the tunnel's own packets, so that they bypass identity-based routes
        self.routing: RouteApplier | None = None  # identity-based routes, set by the daemon once agents can be marked
        self.lock = threading.Lock()  # one apply at a time (status does not take it: see meshd.node.answers)
        self.filter: NodeFilter | None = None
        self._ids: Identities | None = None
        self._policy: Policy | None = None
        self.served: frozenset[int] = frozenset()
        """TCP ports meshd serves here (``meshctl serve``), where acls narrowed to some requests admit: set on
        the event loop, taken with the work (a change compiles the filter afresh)."""
        self._served: frozenset[int] = frozenset()  # as last applied
        self.enforced: tuple[Policy, Identities] | None = None
        """The policy and identities the kernel enforces now, replaced whole (read without the lock)."""
        self._peers: dict[str, PeerConfig] = {}  # by node name: what the device was told
        self._nodes: dict[str, PeerNode] = {}
        # recorded on the loop, taken by take()
        self._full = True
        self._changed_nodes: set[str] = set()
        self._changed_agents: set[str] = set()
        self._agents_reset = True

    # -- recording (event loop) ---------------------------------------------------
    def full(self) -> None:
        self._full = True

    def nodes_changed(self, names: list[str]) -> None:
        self._changed_nodes.update(names)

    def agents_changed(self, ids: list[str]) -> None:
        self._changed_agents.update(ids)

    def agents_reset(self) -> None:
        self._agents_reset = True

    def take(self, policy: Policy, nodes: Mapping[str, PeerNode], agents: Mapping[str, AgentIdentity],
             discovered: Mapping[str, str | None], prefixes: tuple[str, ...]) -> Work:
        work = Work(policy=policy, discovered=dict(discovered), prefixes=prefixes, served=self.served)
        if self._full or self._ids is None:
            work.full_nodes = dict(nodes)
            work.full_agents = list(agents.values())
        else:
            work.nodes = {n: nodes.get(n) for n in self._changed_nodes}
            if self._agents_reset:
                work.full_agents = list(agents.values())
            else:
                work.agents = {a: agents.get(a) for a in self._changed_agents}
        self._full = self._agents_reset = False
        self._changed_nodes.clear()
        self._changed_agents.clear()
        return work

    def restore(self, work: Work) -> None:
        """A failed apply is retried whole: nothing recorded is lost."""
        self._full = True

    # -- applying (worker thread) -------------------------------------------------------
    def _identities(self, work: Work) -> tuple[Identities, list[tuple[Actor, Change]] | None]:
        """The identities after ``work``, and the actors that joined or left (None: rebuilt whole)."""
        if work.full_nodes is not None:
            nodes = {n: node_identity(p) for n, p in work.full_nodes.items()}
            # this node's own addresses are its record's, whatever a cached map says (a node enrolled again gets
            # a new block, and a map cached before it may still be the first one applied)
            me = nodes.get(self.name, self.self_node)
            nodes[self.name] = dataclasses.replace(me, ipv4=self.self_node.ipv4, ipv6=self.self_node.ipv6)
            agents = [a for a in work.full_agents or () if a.node in nodes]
            return Identities.build(nodes.values(), agents), None
        ids = self._ids
        assert ids is not None
        moves: list[tuple[Actor, Change]] = []

        for name, peer in work.nodes.items():
            if name == self.name:
                continue
            new = node_identity(peer) if peer is not None else None
            old = ids.nodes.get(name)
            if old == new:
                continue  # an endpoint moved: nobody's identity changed
            if old is not None:  # the node and the agents riding on it leave (and may rejoin below)
                moves += [(actor, "remove") for actor in ids.bucket(("node", name)).values()]
            if new is None:
                ids = ids.without_node(name)
                continue
            ids = ids.with_node(new)
            moves.append((ids.actors[f"node:{name}"], "add"))
            moves += [(actor, "add") for key, actor in ids.bucket(("node", name)).items() if key != f"node:{name}"]
        changes: Mapping[str, AgentIdentity | None] = work.agents
        if work.full_agents is not None:
            changes = {**{a: None for a in ids.agents}, **{a.id: a for a in work.full_agents}}
        for agent_id, agent in changes.items():
            if agent_id in ids.agents:
                if agent is not None and ids.agents[agent_id] == agent:
                    continue
                moves.append((ids.actors[f"agent:{agent_id}"], "remove"))
                ids = ids.without_agent(agent_id)
            if agent is not None and agent.node in ids.nodes:
                ids = ids.with_agent(agent)
                moves.append((ids.actors[f"agent:{agent_id}"], "add"))
        return ids, moves

    def _filter(self, work: Work, ids: Identities, moves: list[tuple[Actor, Change]] | None) -> NodeFilter:
        """Compile afresh for a new policy or a full map; otherwise only set elements move."""
        nf = self.filter
        if nf is None or moves is None or work.policy is not self._policy or work.served != self._served:
            return compile_node_filter(work.policy, ids, self.name, work.served)
        for actor, change in moves:
            delta = identity_delta(nf, actor, change)
            if not delta.empty:
                nf = apply_delta(nf, delta)
        return nf

    def apply(self, work: Work) -> None:
        with self.lock:
            ids, moves = self._identities(work)
            nf = self._filter(work, ids, moves)
            self.firewall.apply(nf)
            self._ids, self.filter, self._policy = ids, nf, work.policy
            self.enforced = (work.policy, ids)
            self._served = work.served
            self._apply_peers(work)
            if self.routing is not None:  # after the mesh tunnels: route tunnels need the gateways' endpoints
                self.routing.apply(work.policy, ids, self._nodes)

    def _apply_peers(self, work: Work) -> None:
        if work.full_nodes is not None:
            self._nodes = {n: p for n, p in work.full_nodes.items() if n != self.name}
            self._peers = desired_peers(self._nodes, self.name, work.discovered)
            self._apply_device_whole()
            self.netconf.apply(desired_link(self.ifname, self.addresses, work.prefixes))
            return
        upsert, remove = [], []
        for name, peer in work.nodes.items():
            if name == self.name:
                continue
            old = self._peers.pop(name, None)
            self._nodes.pop(name, None)
            if peer is None:
                if old is not None:
                    remove.append(old.public_key)
                continue
            cfg = peer_config(peer, work.discovered)
            if old is not None and old.public_key != cfg.public_key:
                remove.append(old.public_key)  # re-enrolled with a new key
            self._peers[name], self._nodes[name] = cfg, peer
            upsert.append(cfg)
        if (upsert or remove) and not self.device.update_peers(upsert, remove):
            self._apply_device_whole()

    def _apply_device_whole(self) -> None:
        self.device.apply(DeviceConfig(self.private_key, self.listen_port, tuple(self._peers.values()), self.fwmark))
