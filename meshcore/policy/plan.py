"""A policy prepared for compiling: rules flattened into grants, indexed by target.

Each acl is expanded once into :class:`Grant` s — (source class, target
``tag:``/``node:``, protocol, ports) — with services replaced by their nodes,
protocols and ports. Grants are indexed by the tag or node they target, so a
node's rules are the grants of its name and of its tags: no scan of all
rules per node. Grants to agents (``'{principal: P, scope: S}:PORT'``) apply
wherever such agents may run, so they are kept apart (``to_agents``) and
every node looks at them. The plan depends on the policy only, and is built once per
:class:`Policy` object (memoised on it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .fields import ALL_PORTS, NodeSpec, PortRange, Protocol, merge_ports
from .model import Acl, Policy, Selector
from .sources import SourceClass, source_class

__all__ = ["Grant", "PolicyPlan", "plan_policy"]


@dataclass(frozen=True)
class Grant:
    """Acl ``acl`` lets source class ``source`` reach ``target`` on ``protocol``/``ports``.

    ``ports`` is empty for ICMP, which has none. ``narrowed``: the acl allows
    some requests only (``http``/``mcp_tools``), so the connection is admitted
    only on ports meshd serves and checks request by request.
    """

    acl: int
    source: str
    target: NodeSpec | None
    """The nodes it reaches; None for a grant to agents (``agents``)."""
    protocol: Protocol
    ports: tuple[PortRange, ...]
    narrowed: bool = False
    agents: Selector | None = None
    """The agents it reaches, at their own addresses (a ``{...}:PORT`` destination)."""

    def served(self, ports: frozenset[int]) -> tuple[PortRange, ...]:
        """The grant's ports that a node admits at the connection level when it serves ``ports``."""
        if not self.narrowed:
            return self.ports
        return tuple(PortRange(p, p) for p in sorted(ports) if any(lo <= p <= hi for lo, hi in self.ports))

    def covers(self, protocol: Protocol, port: int | None) -> bool:
        if protocol != self.protocol:
            return False
        return protocol == "icmp" or (port is not None and any(lo <= port <= hi for lo, hi in self.ports))


@dataclass(frozen=True)
class PolicyPlan:
    sources: Mapping[str, SourceClass]
    acl_sources: tuple[str, ...]
    by_tag: Mapping[str, tuple[Grant, ...]]
    by_node: Mapping[str, tuple[Grant, ...]]
    narrowed: bool = False
    """Some acl narrows by request: what a node serves changes its filter."""
    to_agents: tuple[Grant, ...] = ()
    """Grants whose destination is agents: they apply on every node such agents may run on."""

    def grants_for(self, name: str | None, tags: Iterable[str]) -> list[Grant]:
        """Every grant whose target is node ``name`` or one of ``tags``."""
        out = list(self.by_node.get(name, ())) if name is not None else []
        for tag in tags:
            out += self.by_tag.get(tag, ())
        return out


def plan_policy(policy: Policy) -> PolicyPlan:
    """The plan of ``policy``, built on first use and memoised on the policy object.

    The memo remembers the very field objects it was built from, so a copy
    made with ``model_copy(update=...)`` (which carries private attributes
    along) never reuses a plan of different rules.
    """
    inputs = (policy.acls, policy.services, policy.groups)
    cached = policy._plan
    if isinstance(cached, tuple) and all(a is b for a, b in zip(cached[0], inputs)):
        plan: PolicyPlan = cached[1]
        return plan
    plan = _build(policy)
    policy._plan = (inputs, plan)
    return plan


def _build(policy: Policy) -> PolicyPlan:
    sources: dict[str, SourceClass] = {}
    acl_sources: list[str] = []
    by_tag: dict[str, list[Grant]] = {}
    by_node: dict[str, list[Grant]] = {}
    to_agents: list[Grant] = []
    for index, acl in enumerate(policy.acls):
        source = source_class(acl.source, policy.groups)
        sources.setdefault(source.name, source)
        acl_sources.append(source.name)
        for grant in _grants(index, source.name, acl, policy):
            if grant.target is None:
                to_agents.append(grant)
                continue
            table = by_tag if grant.target.kind == "tag" else by_node
            table.setdefault(grant.target.name, []).append(grant)
    return PolicyPlan(
        sources=sources,
        acl_sources=tuple(acl_sources),
        by_tag={k: tuple(v) for k, v in by_tag.items()},
        by_node={k: tuple(v) for k, v in by_node.items()},
        narrowed=any(acl.narrowed for acl in policy.acls),
        to_agents=tuple(to_agents),
    )


def _grants(index: int, source: str, acl: Acl, policy: Policy) -> Iterable[Grant]:
    for dest in acl.to:
        if dest.kind == "service":
            service = policy.services[dest.name]
            for target in service.nodes:
                for protocol in service.protocol:
                    ports = () if protocol == "icmp" else merge_ports(service.ports)
                    yield Grant(index, source, target, protocol, ports, acl.narrowed)
        else:
            to: NodeSpec | None = None if dest.kind == "agents" else NodeSpec(dest.kind, dest.name)
            for protocol in acl.protocol or ("tcp",):
                ports = () if protocol == "icmp" else (dest.ports or ALL_PORTS,)
                yield Grant(index, source, to, protocol, ports, acl.narrowed, dest.selector)
