"""The compiler: (policy, identities, node) -> the node's filter, as frozen data.

Pure: no I/O, no clock, no randomness; equal inputs give equal outputs and
equal hashes. Two entry points:

* :func:`compile_node_filter` — one node, the reference;
* :func:`compile_mesh` — every node, resolving each source class once
  (Headscale style) and sharing the result between nodes whose tags and
  name select the same grants.

And the cheap path for identity churn: :func:`identity_delta` gives the set
elements one identity adds to or removes from a compiled filter, and
:func:`apply_delta` applies them; compiling afresh gives the same filter.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Literal, NamedTuple

from ..errors import InvalidInput
from .fields import PortRange, Protocol, merge_ports
from .identities import Actor, Identities, NodeIdentity
from .model import Policy
from .plan import Grant, PolicyPlan, plan_policy
from .sources import SourceClass, resolve, source_class

__all__ = [
    "AddressSet",
    "Change",
    "FilterDelta",
    "FilterRule",
    "MeshFilters",
    "NodeFilter",
    "apply_delta",
    "compile_mesh",
    "compile_node_filter",
    "identity_delta",
]

Change = Literal["add", "remove"]


class AddressSet(NamedTuple):
    """The members of one source class: IPv4 and IPv6 addresses (``ipv4_addr``/``ipv6_addr`` sets)."""

    v4: frozenset[str]
    v6: frozenset[str]


_EMPTY = AddressSet(frozenset(), frozenset())


@dataclass(frozen=True)
class FilterRule:
    """Accept ``protocol`` from set ``source`` to ``ports`` (empty for ICMP; ``*`` is 0-65535).

    ``acls`` are the indexes of the policy rules it came from: for logs and
    explanations only, left out of equality and of :attr:`NodeFilter.rules_hash`
    (reordering the policy's rules changes no filter).
    """

    source: str
    protocol: Protocol
    ports: tuple[PortRange, ...]
    acls: tuple[int, ...] = field(default=(), compare=False)
    to: str | None = None
    """The set of this node's agents the rule admits to (agents as servers); None: the node's own addresses."""

    def text(self) -> str:
        ports = ",".join(str(p) for p in self.ports)
        return f"{self.source} {self.protocol}" + (f" {ports}" if ports else "") + (f" to {self.to}" if self.to else "")

    def admits(self, protocol: Protocol, port: int | None) -> bool:
        if protocol != self.protocol:
            return False
        return protocol == "icmp" or (port is not None and any(lo <= port <= hi for lo, hi in self.ports))


@dataclass(frozen=True)
class NodeFilter:
    """What one node admits over the mesh, and how a packet is judged against it.

    Evaluation order — what the nftables applier renders and :meth:`allows`
    does, for a packet arriving on the mesh interface (input and forward):

    1. part of a connection already accepted (``ct state established,related``):
       accept;
    2. its source address is in a rule's set (the IPv4 or the IPv6 half, by
       family), its destination is the rule's — the node's own address
       (``addresses``), or for a rule with ``to`` an address in that set (the
       node's agents the rule admits to) — its protocol is the rule's and,
       for TCP/UDP, its destination port lies in the rule's ports: accept.
       Rules are a *union of allows*:
       none denies, so their order never changes the verdict and the applier
       may render them in any order or as one verdict map;
    3. anything else: drop (default deny).

    ``icmp`` means ICMP for IPv4 and ICMPv6 for IPv6. ``sets`` maps a set name
    to its (IPv4, IPv6) members; ``sources`` says which selector each set
    stands for (for comments, and for :func:`identity_delta`). Rules name
    sets and never list addresses, so an identity joining or leaving changes
    set elements, never rules.

    ``rules_hash`` covers the rules and the node's addresses: when it changes,
    replace the table in one batch; when only ``sets`` change, add or delete
    elements.
    ``digest`` covers rules and elements: log it as what is installed.
    """

    node: str
    rules: tuple[FilterRule, ...]
    sources: Mapping[str, SourceClass] = field(compare=False)
    sets: Mapping[str, AddressSet]
    addresses: tuple[str | None, str | None] = (None, None)
    """The node's own IPv4 and IPv6 address: what rules without ``to`` admit to."""

    @cached_property
    def rules_hash(self) -> str:
        """The rules and the node's own addresses (rendered into them): what, changed, replaces the table."""
        return _rules_hash(self.rules, self.addresses)

    @cached_property
    def digest(self) -> str:
        h = hashlib.sha256(self.rules_hash.encode())
        for name in sorted(self.sets):
            members = self.sets[name]
            h.update(f"\n{name}:{','.join(sorted(members.v4))}|{','.join(sorted(members.v6))}".encode())
        return h.hexdigest()

    def allows(self, address: str, protocol: Protocol, port: int | None, to: str | None = None) -> bool:
        """The verdict for a new flow's first packet from ``address`` to ``to`` (None: the node itself);
        step 2, then 3, of the evaluation order."""
        family = 6 if ":" in address else 4
        for rule in self.rules:
            members = self.sets[rule.source]
            if address not in (members.v6 if family == 6 else members.v4) or not rule.admits(protocol, port):
                continue
            if rule.to is None and to is None:
                return True
            if rule.to is not None and to is not None:
                dest = self.sets[rule.to]
                if to in (dest.v6 if family == 6 else dest.v4):
                    return True
        return False


@lru_cache(maxsize=4096)
def _rules_hash(rules: tuple[FilterRule, ...], addresses: tuple[str | None, str | None]) -> str:
    text = "\n".join(r.text() for r in rules)
    if addresses != (None, None):  # (a filter made without them hashes as before)
        text = f"to {addresses[0]} {addresses[1]}\n{text}"
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class FilterDelta:
    """Set elements to add to and remove from one node's filter; rules are untouched."""

    node: str
    add: Mapping[str, AddressSet] = field(default_factory=dict)
    remove: Mapping[str, AddressSet] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.add and not self.remove


def _node_rules(grants: Iterable[tuple[Grant, str | None]], served: frozenset[int] = frozenset()
                ) -> tuple[FilterRule, ...]:
    """Grants (each with the destination set it admits to) with the same source, protocol and destination
    become one rule with merged ports.

    A grant narrowed to some requests keeps only the ports the node serves
    (``served``): elsewhere no one checks its requests, so it admits nothing.
    """
    acc: dict[tuple[str, Protocol, str], tuple[list[PortRange], set[int]]] = {}
    for grant, to in grants:
        admitted = grant.served(served)
        if grant.narrowed and not admitted:
            continue
        ports, acls = acc.setdefault((grant.source, grant.protocol, to or ""), ([], set()))
        ports.extend(admitted)
        acls.add(grant.acl)
    return tuple(
        FilterRule(source, protocol, merge_ports(ports), tuple(sorted(acls)), to or None)
        for (source, protocol, to), (ports, acls) in sorted(acc.items())
    )


def _agent_classes(plan: PolicyPlan, node: NodeIdentity, groups: Mapping[str, Sequence[str]]
                   ) -> dict[str, SourceClass]:
    """For each agents destination the policy names: the class of such agents running on ``node``, by the
    destination's text (none when no agent of ``node`` can match, e.g. it names another node or tag)."""
    out: dict[str, SourceClass] = {}
    for grant in plan.to_agents:
        selector = grant.agents
        assert selector is not None
        text = selector.text()
        if text in out or (selector.node is not None and selector.node != node.name) \
                or (selector.tag is not None and selector.tag not in node.tags) \
                or (selector.owner is not None and selector.owner != node.owner):
            continue
        out[text] = source_class(selector.model_copy(update={"node": node.name}), groups)
    return out


def _grants_here(plan: PolicyPlan, node: NodeIdentity, groups: Mapping[str, Sequence[str]]
                 ) -> tuple[list[tuple[Grant, str | None]], dict[str, SourceClass]]:
    """The grants that apply on ``node`` with the destination set each admits to (None: the node itself)."""
    grants: list[tuple[Grant, str | None]] = [(g, None) for g in plan.grants_for(node.name, node.tags)]
    classes = _agent_classes(plan, node, groups) if plan.to_agents else {}
    for grant in plan.to_agents:
        assert grant.agents is not None
        dest = classes.get(grant.agents.text())
        if dest is not None:
            grants.append((grant, dest.name))
    return grants, {c.name: c for c in classes.values()}


def compile_node_filter(policy: Policy, identities: Identities, node_name: str,
                        served: frozenset[int] = frozenset()) -> NodeFilter:
    """The filter of node ``node_name``: who may reach which of its ports.

    The node's rules come from the grants of its name and tags; each set the
    rules name is resolved through the identities' index. ``served``: the
    TCP ports meshd serves on the node, where acls narrowed to some requests
    apply.
    """
    plan = plan_policy(policy)
    node = identities.node(node_name)
    grants, destinations = _grants_here(plan, node, policy.groups)
    rules = _node_rules(grants, served)
    classes = {**plan.sources, **destinations}
    names = sorted({r.source for r in rules} | {r.to for r in rules if r.to})
    return NodeFilter(
        node=node.name,
        rules=rules,
        sources={n: classes[n] for n in names},
        sets={n: AddressSet(*resolve(classes[n], identities)) for n in names},
        addresses=(node.ipv4, node.ipv6),
    )


@dataclass(frozen=True)
class MeshFilters:
    """Every node's filter, from one resolution of each source class.

    ``sets`` holds every source class some node uses, resolved once; the
    filters share those frozensets (and nodes with the same relevant tags
    share rules), so memory grows with distinct classes, not nodes x rules.
    """

    filters: Mapping[str, NodeFilter]
    sets: Mapping[str, AddressSet]
    sources: Mapping[str, SourceClass]

    @cached_property
    def users(self) -> Mapping[str, tuple[str, ...]]:
        """Set name -> the nodes whose filters use it: where an identity change must go."""
        out: dict[str, list[str]] = {}
        for node, node_filter in self.filters.items():
            for name in node_filter.sets:
                out.setdefault(name, []).append(node)
        return {k: tuple(v) for k, v in out.items()}

    def identity_delta(self, actor: Actor, change: Change) -> dict[str, FilterDelta]:
        """Per node, the elements ``actor`` adds or removes; nodes it does not touch are left out."""
        if change == "add":
            affected = [name for name, source in self.sources.items() if source.matches(actor)]
        else:
            affected = [name for name, members in self.sets.items() if _holds(members, actor)]
        elements = _elements(actor)
        per_node: dict[str, dict[str, AddressSet]] = {}
        for name in affected:
            for node in self.users.get(name, ()):
                per_node.setdefault(node, {})[name] = elements
        if change == "add":
            return {node: FilterDelta(node, add=sets) for node, sets in per_node.items()}
        return {node: FilterDelta(node, remove=sets) for node, sets in per_node.items()}


def compile_mesh(policy: Policy, identities: Identities,
                 served: Mapping[str, frozenset[int]] | None = None) -> MeshFilters:
    """Every node's filter; equal, node by node, to :func:`compile_node_filter` (``served`` by node name)."""
    plan = plan_policy(policy)
    resolved: dict[str, AddressSet] = {}
    shapes: dict[tuple[str | None, frozenset[str], frozenset[int]],
                 tuple[tuple[FilterRule, ...], dict[str, SourceClass], dict[str, AddressSet]]] = {}
    filters: dict[str, NodeFilter] = {}
    classes: dict[str, SourceClass] = dict(plan.sources)
    for node in identities.nodes.values():
        ports = (served or {}).get(node.name, frozenset()) if plan.narrowed else frozenset()
        shape = (*_shape(plan, node.name, node.tags), ports)
        if shape not in shapes:
            grants, destinations = _grants_here(plan, node, policy.groups)
            classes.update(destinations)
            rules = _node_rules(grants, ports)
            names = sorted({r.source for r in rules} | {r.to for r in rules if r.to})
            for name in names:
                if name not in resolved:
                    resolved[name] = AddressSet(*resolve(classes[name], identities))
            shapes[shape] = (rules, {n: classes[n] for n in names}, {n: resolved[n] for n in names})
        rules, sources, sets = shapes[shape]
        filters[node.name] = NodeFilter(node=node.name, rules=rules, sources=sources, sets=sets,
                                        addresses=(node.ipv4, node.ipv6))
    return MeshFilters(filters=filters, sets=resolved, sources={n: classes[n] for n in resolved})


def _shape(plan: PolicyPlan, name: str, tags: frozenset[str]) -> tuple[str | None, frozenset[str]]:
    """What of a node the policy looks at: its name if a rule names it (or agents: their sets are the node's),
    its tags that rules name."""
    named = name in plan.by_node or bool(plan.to_agents)
    return (name if named else None, frozenset(t for t in tags if t in plan.by_tag or plan.to_agents))


def _elements(actor: Actor) -> AddressSet:
    return AddressSet(
        frozenset(() if actor.ipv4 is None else (actor.ipv4,)),
        frozenset(() if actor.ipv6 is None else (actor.ipv6,)),
    )


def _holds(members: AddressSet, actor: Actor) -> bool:
    return actor.ipv4 in members.v4 or actor.ipv6 in members.v6


def identity_delta(node_filter: NodeFilter, actor: Actor, change: Change) -> FilterDelta:
    """The set elements ``actor`` joining (``add``) or leaving (``remove``) changes in ``node_filter``.

    Adding matches the actor against each of the filter's source classes;
    removing looks its addresses up in each set (so it removes whatever is
    there, even if the identity's attributes changed since). Cost: one
    match or lookup per set of the node, independent of the mesh's size.
    """
    out: dict[str, AddressSet] = {}
    if change == "add":
        for name, source in node_filter.sources.items():
            if source.matches(actor):
                have = node_filter.sets[name]
                new = AddressSet(_elements(actor).v4 - have.v4, _elements(actor).v6 - have.v6)
                if new.v4 or new.v6:
                    out[name] = new
        return FilterDelta(node_filter.node, add=out)
    for name, members in node_filter.sets.items():
        if _holds(members, actor):
            gone = _elements(actor)
            out[name] = AddressSet(gone.v4 & members.v4, gone.v6 & members.v6)
    return FilterDelta(node_filter.node, remove=out)


def apply_delta(node_filter: NodeFilter, delta: FilterDelta) -> NodeFilter:
    """A new filter with ``delta``'s elements added and removed; rules (and ``rules_hash``) unchanged."""
    if delta.node != node_filter.node:
        raise InvalidInput(f"a delta for node {delta.node} cannot apply to the filter of {node_filter.node}")
    sets = dict(node_filter.sets)
    for name, elements in delta.add.items():
        have = sets.get(name, _EMPTY)
        sets[name] = AddressSet(have.v4 | elements.v4, have.v6 | elements.v6)
    for name, elements in delta.remove.items():
        have = sets.get(name, _EMPTY)
        sets[name] = AddressSet(have.v4 - elements.v4, have.v6 - elements.v6)
    return dataclasses.replace(node_filter, sets=sets)
