"""The agent identities this node honors, each checked here, by this node.

An agent certificate pushed by the controller enters the book only after
the node itself has verified it: signed by the mesh CA, inside its validity
window on this node's clock, an X509-SVID of kind agent, and bound to a
node — its addresses lie in the block of the node it claims to run on, so
WireGuard (which admits a peer's packets only from that peer's block) and
the certificate agree on where the agent's packets may come from. Only then
does its address reach an nftables set. Expiry is enforced by :meth:`expire`
on the node's own clock, with or without the controller.

Pure apart from the clock, which the caller passes in.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509

from meshcore.errors import IdmeshError, InvalidCertificate
from meshcore.identity import load_certificate, verify_leaf
from meshcore.policy import AgentIdentity
from meshcore.wire.stream import PeerNode

__all__ = ["AgentBook", "HeldAgent", "IdentityView"]

log = logging.getLogger("meshd.agents.supervisor")


@dataclass(frozen=True)
class HeldAgent:
    identity: AgentIdentity
    not_after: datetime
    serial: str
    grant: str | None = None
    """The grant it was born from (its principal authorized it); None: the node's word, under a delegation."""
    pem: str = field(default="", repr=False)
    """The certificate it was admitted with."""

    @property
    def authorized_by(self) -> str:
        a = self.identity
        return f"{a.principal} (grant {self.grant})" if self.grant else f"node {a.node} (delegation)"


class IdentityView(Mapping[str, AgentIdentity]):
    """The book's agents as identities, without copying them: a change must not cost O(agents)."""

    def __init__(self, agents: Mapping[str, HeldAgent]) -> None:
        self._agents = agents

    def __getitem__(self, agent_id: str) -> AgentIdentity:
        return self._agents[agent_id].identity

    def __iter__(self) -> Iterator[str]:
        return iter(self._agents)

    def __len__(self) -> int:
        return len(self._agents)


class AgentBook:
    def __init__(self, ca: x509.Certificate) -> None:
        self.ca = ca
        self.agents: dict[str, HeldAgent] = {}
        self.identities = IdentityView(self.agents)
        self._by_address: dict[str, str] = {}
        self._pem_of: dict[str, str] = {}  # the certificate of each held agent -> its id
        self._revoked: set[str] = set()
        # Identities that ended lately, by address: only to name the sender of a flow
        # logged just after its agent exited. Never consulted for honoring anything.
        self._recent: dict[str, HeldAgent] = {}

    def held(self, pem: str, now: datetime) -> HeldAgent | None:
        """The agent of this very certificate, if it is held and still valid: nothing to verify again.

        Every agent born here arrives twice (its birth, then the controller's
        echo on the stream), and every node's book sees each certificate once
        per reconnection: the signature check is most of what admitting costs.
        """
        agent_id = self._pem_of.get(pem)
        held = self.agents.get(agent_id) if agent_id else None
        return held if held is not None and now < held.not_after else None

    def admit(self, pem: str, nodes: Mapping[str, PeerNode], now: datetime) -> HeldAgent:
        """Verify one agent certificate and hold it; raise InvalidCertificate saying why not."""
        if (same := self.held(pem, now)) is not None:
            return same
        ident = verify_leaf(load_certificate(pem), self.ca, now)
        c = ident.claims
        agent_id = ident.spiffe_id.name
        if ident.spiffe_id.kind != "agent" or not c.node or not c.principal or not c.scopes:
            raise InvalidCertificate(f"{ident.spiffe_id}: not an agent certificate with node, principal and scopes")
        if agent_id in self._revoked:
            raise InvalidCertificate(f"{ident.spiffe_id} has been revoked")
        node = nodes.get(c.node)
        if node is None:
            raise InvalidCertificate(f"{ident.spiffe_id} claims node {c.node}, which is not in the mesh")
        if len(c.addresses) != 2:
            raise InvalidCertificate(f"{ident.spiffe_id}: expected one IPv4 and one IPv6 address")
        blocks = [ipaddress.ip_network(b) for b in node.blocks]
        for address in c.addresses:
            ip = ipaddress.ip_address(address)
            if not any(ip.version == b.version and ip in b for b in blocks) or address in node.addresses:
                raise InvalidCertificate(f"{ident.spiffe_id}: address {address} is outside node {c.node}'s agent pool")
        held = HeldAgent(
            AgentIdentity(id=agent_id, name=c.name or agent_id, principal=c.principal, scopes=c.scopes,
                          node=c.node, parent=c.parent, ipv4=c.addresses[0], ipv6=c.addresses[1],
                          authorized=c.authorized),
            ident.not_after, ident.serial_hex, c.grant, pem)
        self.drop([agent_id])
        for address in c.addresses:
            previous = self._by_address.get(address)
            if previous is not None:  # an address is re-used only after its holder ended
                self.drop([previous])
        self.agents[agent_id] = held
        self._pem_of[pem] = agent_id
        for address in c.addresses:
            self._by_address[address] = agent_id
        return held

    def admit_all(self, pems: tuple[str, ...], nodes: Mapping[str, PeerNode], now: datetime) -> list[str]:
        """Admit what verifies; log (never raise for) what does not. Returns the ids admitted (not those
        already held with the same certificate: nothing changed for them)."""
        admitted = []
        for pem in pems:
            if self.held(pem, now) is not None:
                continue
            try:
                admitted.append(self.admit(pem, nodes, now).identity.id)
            except IdmeshError as exc:
                log.warning("agent certificate refused: %s", exc)
        return admitted

    def replace_all(self, pems: tuple[str, ...], nodes: Mapping[str, PeerNode], now: datetime) -> None:
        self.agents.clear()
        self._pem_of.clear()
        self._by_address.clear()
        self._revoked.clear()
        self.admit_all(pems, nodes, now)

    def drop(self, ids: list[str] | tuple[str, ...], revoked: bool = False) -> list[str]:
        gone = []
        for agent_id in ids:
            if revoked:
                self._revoked.add(agent_id)
            held = self.agents.pop(agent_id, None)
            if held is not None:
                gone.append(agent_id)
                self._pem_of.pop(held.pem, None)
                if len(self._recent) > 4096:
                    self._recent.clear()
                self._recent[held.identity.ipv4] = self._recent[held.identity.ipv6] = held
                for address in (held.identity.ipv4, held.identity.ipv6):
                    if self._by_address.get(address) == agent_id:
                        del self._by_address[address]
        return gone

    def expire(self, now: datetime) -> list[str]:
        return self.drop([i for i, h in self.agents.items() if now >= h.not_after])

    def forget_node(self, node: str) -> list[str]:
        return self.drop([i for i, h in self.agents.items() if h.identity.node == node])

    def by_address(self, address: str) -> HeldAgent | None:
        agent_id = self._by_address.get(str(ipaddress.ip_address(address)))
        return self.agents.get(agent_id) if agent_id else None

    def recently_held(self, address: str) -> HeldAgent | None:
        """Who held ``address`` last, if the identity ended lately (for attributing logged flows)."""
        return self.by_address(address) or self._recent.get(str(ipaddress.ip_address(address)))
