"""What this node knows of the mesh: the netmap, the policy in force, the agent identities it verified.

The controller's stream changes it (:meth:`MeshView.on_full`, ``on_delta``,
``on_policy``, ``on_agents``); so do this node's own clock (expiry) and its
own agents (a new one is honored here before the controller echoes it).
Each change is recorded on the data plane (what to redo) and then
``changed`` wakes the converger, which applies it.

The netmap and the policy are cached in the state directory, so a
restarted meshd enforces the last policy and rebuilds its tunnels before
the controller answers (the data plane outlives the control plane). The
netmap is written at most every :data:`SNAPSHOT_EVERY` seconds: a
10,000-node map costs about 25 ms to write.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from meshcore.errors import IdmeshError, InvalidInput, NotFound
from meshcore.identity import load_certificate
from meshcore.netmap import NodeView, ResyncNeeded
from meshcore.policy import Policy, load_policy
from meshcore.wire.api import AgentIssued
from meshcore.wire.local import Whois
from meshcore.wire.stream import AgentUpdate, Netmap, NetmapDelta, PolicyDoc
from meshd.agents.book import AgentBook
from meshd.mesh.dataplane import DataPlane, Work
from meshd.node.state import StateDir, write_private

__all__ = ["SNAPSHOT_EVERY", "MeshView"]

log = logging.getLogger("meshd")
SNAPSHOT_EVERY = 5.0


def _read_cached(path: Path, model: type[Netmap | PolicyDoc]) -> Netmap | PolicyDoc | None:
    try:
        return model.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def _parse_policy(doc: PolicyDoc | None) -> Policy | None:
    if doc is None:
        return None
    try:
        return load_policy(doc.text, doc.filename)
    except IdmeshError as exc:  # the controller validated it: this is a version skew
        log.error("policy version %d does not load here, keeping the previous one: %s", doc.version, exc)
        return None


class MeshView:
    def __init__(self, state: StateDir, changed: Callable[[], None],
                 peers_changed: Callable[[], None] = lambda: None) -> None:
        self._netmap_file = state.path / "netmap.json"
        self._policy_file = state.path / "policy.json"
        cached = _read_cached(self._netmap_file, Netmap)
        self.view: NodeView | None = NodeView(cached) if isinstance(cached, Netmap) else None
        doc = _read_cached(self._policy_file, PolicyDoc)
        self.policy_doc: PolicyDoc | None = doc if isinstance(doc, PolicyDoc) else None
        self.policy: Policy = _parse_policy(self.policy_doc) or load_policy("", "<no policy>")
        self.book = AgentBook(load_certificate(state.ca_cert.read_bytes()))
        self.applied_version: int | None = None
        self.plane: DataPlane | None = None
        self._taken: NodeView | None = None
        self._changed = changed
        self._peers_changed = peers_changed  # NAT traversal re-reads the peers' candidates
        self._snapshot_due = False
        self._snapshot_at = 0.0

    @property
    def version(self) -> int | None:
        return self.view.version if self.view else None

    # -- the controller's stream --------------------------------------------------------------------
    def _netmap_changed(self) -> None:
        self._snapshot_due = True
        self._peers_changed()
        self._changed()

    def on_full(self, netmap: Netmap) -> None:
        self.view = NodeView(netmap)
        for agent_id in [a for a, h in self.book.agents.items() if h.identity.node not in netmap.nodes]:
            self.book.drop([agent_id])
        log.info("netmap version %d: %d nodes", netmap.version, len(netmap.nodes))
        if self.plane:
            self.plane.full()
        self._netmap_changed()

    def on_delta(self, delta: NetmapDelta) -> None:
        if self.view is None:
            raise ResyncNeeded("a delta before any full map")
        changed, removed = self.view.apply(delta)
        if not (changed or removed):
            return
        gone_agents = [a for name in removed for a in self.book.forget_node(name)]
        log.info("netmap version %d: %s%s", delta.version, " ".join(f"+{n.name}" for n in changed),
                 "".join(f" -{n}" for n in removed))
        if self.plane:
            self.plane.nodes_changed([n.name for n in changed] + removed)
            self.plane.agents_changed(gone_agents)
        self._netmap_changed()

    def on_policy(self, doc: PolicyDoc) -> None:
        if self.policy_doc is not None and doc.hash == self.policy_doc.hash:
            return
        policy = _parse_policy(doc)
        if policy is None:
            return
        self.policy, self.policy_doc = policy, doc
        write_private(self._policy_file, doc.model_dump_json(), 0o644)
        log.info("policy version %d (sha256:%s)", doc.version, doc.hash[:16])
        self._changed()

    def on_agents(self, update: AgentUpdate) -> None:
        now = datetime.now(UTC)
        nodes = self.view.nodes if self.view else {}
        if update.full:
            self.book.replace_all(update.certificates, nodes, now)
            if self.plane:
                self.plane.agents_reset()
        else:
            changed = self.book.drop(update.revoked, revoked=True)
            changed += self.book.admit_all(update.certificates, nodes, now)
            if not changed:
                return  # e.g. the echo of an agent born here: already honored
            if self.plane:
                self.plane.agents_changed(changed)
        self._changed()

    # -- this node's own events -----------------------------------------------------------------------
    def expire(self, now: datetime) -> None:
        """Drop identities past their not-after, on this node's clock (also with the controller away)."""
        expired = self.book.expire(now)
        if expired and self.plane:
            self.plane.agents_changed(expired)
            self._changed()

    def admit_local(self, issued: AgentIssued) -> None:
        """An agent born here is honored at once, before the controller's stream echoes it."""
        if self.view is None:
            return
        held = self.book.admit(issued.certificate, self.view.nodes, datetime.now(UTC))
        if self.plane:
            self.plane.agents_changed([held.identity.id])

    def discovered(self, public_key: str) -> None:
        """LAN discovery found the node with this key: its endpoint may change."""
        for name, node in (self.view.nodes.items() if self.view else ()):
            if node.wireguard_public_key == public_key and self.plane:
                self.plane.nodes_changed([name])
                self._changed()

    # -- for the converger ------------------------------------------------------------------------------
    def take(self, found: dict[str, str | None], prefixes: tuple[str, ...]) -> Work:
        """The data plane's work for one pass, snapshotted on the event loop."""
        assert self.plane is not None
        view = self._taken = self.view
        return self.plane.take(self.policy, view.nodes if view else {}, self.book.identities, found,
                               view.prefixes if view else prefixes)

    def applied(self) -> None:
        """The last pass taken is in the kernel: its netmap version is what this node enforces."""
        self.applied_version = self._taken.version if self._taken else None
        self.write_snapshot()

    def write_snapshot(self, force: bool = False) -> None:
        """The cached netmap, written at most every SNAPSHOT_EVERY seconds (and when forced, at shutdown)."""
        if self.view is None or not (self._snapshot_due and (force or time.monotonic() - self._snapshot_at
                                                             >= SNAPSHOT_EVERY)):
            return
        write_private(self._netmap_file, self.view.snapshot().model_dump_json(), 0o644)
        self._snapshot_due, self._snapshot_at = False, time.monotonic()

    # -- questions ----------------------------------------------------------------------------------------
    def whois(self, address: str, recent: bool = False) -> Whois:
        """Who holds an overlay address, from what this node has verified itself.

        ``recent``: an agent that ended a moment ago still names its flows (the flow log asks so).
        """
        try:
            canonical = str(ipaddress.ip_address(address))
        except ValueError as exc:
            raise InvalidInput(f"not an IP address: {address!r}") from exc
        held = self.book.recently_held(canonical) if recent else self.book.by_address(canonical)
        if held is not None:
            a = held.identity
            return {"kind": "agent", "node": a.node, "principal": a.principal, "agent": a.id, "name": a.name,
                    "scopes": [str(s) for s in a.scopes], "parent": a.parent, "expires": held.not_after.isoformat(),
                    "addresses": [a.ipv4, a.ipv6], "authorized_by": held.authorized_by}
        for node in (self.view.nodes.values() if self.view else ()):
            if canonical in node.addresses:
                return {"kind": "node", "node": node.name, "principal": node.owner, "agent": None, "scopes": [],
                        "parent": None, "expires": None, "tags": list(node.tags), "addresses": list(node.addresses)}
        raise NotFound(f"no identity this node honors holds {canonical}")
