"""Checks that need the whole policy: references, and fields that can never matter.

A rule in which one field makes another meaningless is an error, not a
warning (STYLE.md, "reject the meaningless early"): the author believed that
field did something, and whatever they believed is not what the mesh will
do. Two kinds are caught:

* *never matches* — fields contradict (``via: direct`` with a ``scope`` or
  ``authorized``: a device acting without an agent holds no scope and was
  authorized by nobody), so the rule allows nothing;
* *never matters* — a wildcard or a broader field hides another (``scope:
  "*:*"`` with ``via: agent``, ``principal`` already in the named ``group``,
  port ``8050`` next to ``8000-8100``, a ``requires_grant`` pattern outside
  the delegation's scopes), so the field is dead text.

One redundancy is allowed on purpose: ``via: agent`` next to ``scope``,
``agent`` or ``authorized``, because SPEC.md's own example writes it and it
reads well.

Facts these checks rely on: a node is owned by a principal or tagged, never
both; a node acting directly acts as its owner (a tagged node has no
principal); every agent acts for a principal and holds at least one scope.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from ..problems import Path, Problem
from ..scopes import Scope, scopes_overlap
from .fields import ALL_PORTS, Destination, PortRange

if TYPE_CHECKING:
    from .model import Acl, Delegation, FlowSource, Policy, Selector, Service

__all__ = ["flow_destination_problems", "flow_source_problems", "policy_problems", "selector_problems"]

_ANY_SCOPE = Scope("*", "*")


def policy_problems(policy: Policy) -> list[Problem]:
    """Every whole-file problem, in file order (sections in the order they are checked)."""
    out: list[Problem] = []
    for name, members in policy.groups.items():
        out += _duplicates(members, ("groups", name), f"is listed twice in group {name!r}")
    for name, service in policy.services.items():
        out += _service_problems(service, ("services", name))
    for i, acl in enumerate(policy.acls):
        out += _acl_problems(acl, policy, ("acls", i))
    for i, delegation in enumerate(policy.delegations):
        out += _delegation_problems(delegation, ("delegations", i))
    for i, route in enumerate(policy.routes):
        out += selector_problems(route.source, policy.groups, ("routes", i, "from"))
        out += _duplicates(route.to, ("routes", i, "to"))
        out += _duplicates(route.via, ("routes", i, "via"))
    for i, test in enumerate(policy.tests):
        out += flow_source_problems(test.source, policy.groups, ("tests", i, "from"))
        out += flow_destination_problems(test.to, test.protocol, policy.services, ("tests", i, "to"))
        if test.is_request and test.protocol != "tcp":
            out.append(Problem(("tests", i, "protocol"), "a test of a request (method, path, tool) is about "
                               "TCP: HTTP travels over it"))
        if test.tool is not None and test.method not in (None, "POST"):
            out.append(Problem(("tests", i, "method"), f"an MCP tools/call is a POST, not a {test.method}"))
    return out


def _duplicates(items: Sequence[object], at: Path, what: str = "is listed twice") -> list[Problem]:
    seen: set[str] = set()
    out = []
    for k, item in enumerate(items):
        key = str(item)
        if key in seen:
            out.append(Problem(at + (k,), f"{item} {what}"))
        seen.add(key)
    return out


def _hidden_ports(ports: Sequence[PortRange], at: Path, where: Sequence[object] | None = None) -> list[Problem]:
    """A port range inside another listed range never matters; report each once."""
    out = []
    for k, inner in enumerate(ports):
        for m, outer in enumerate(ports):
            if m == k or not (outer.lo <= inner.lo and inner.hi <= outer.hi):
                continue
            if inner == outer and m > k:
                continue  # a duplicate is reported at its second occurrence
            shown = where if where is not None else ports
            if inner == outer:
                message = f"{shown[k]} is listed twice"
            else:
                message = f"{shown[k]} never matters: {shown[m]} already covers it"
            out.append(Problem(at + (k,), message))
            break
    return out


def _service_problems(service: Service, at: Path) -> list[Problem]:
    out = _duplicates(service.nodes, at + ("nodes",))
    portful = [p for p in service.protocol if p != "icmp"]
    if not portful and service.ports:
        out.append(Problem(at + ("ports",), "ports never matter: ICMP has no ports"))
    if portful and not service.ports:
        out.append(Problem(at, f"missing ports: a {'/'.join(portful)} service needs at least one port (or '*')"))
    out += _hidden_ports(service.ports, at + ("ports",), [f"port {p}" for p in service.ports])
    return out


def _acl_problems(acl: Acl, policy: Policy, at: Path) -> list[Problem]:
    out = selector_problems(acl.source, policy.groups, at + ("from",))
    out += _duplicates(acl.to, at + ("to",))
    protocols = acl.protocol or ("tcp",)
    for j, dest in enumerate(acl.to):
        here = at + ("to", j)
        if dest.kind == "service":
            if dest.name not in policy.services:
                out.append(Problem(here, f"unknown service {dest.name!r}" + _known(policy.services)))
            elif dest.ports is not None:
                out.append(
                    Problem(
                        here,
                        f"a service brings its own ports: write {dest.name!r}, "
                        f"or name the port on a tag or node (tag:NAME:{dest.ports})",
                    )
                )
        elif dest.ports is not None and all(p == "icmp" for p in protocols):
            out.append(Problem(here, f"the port of {dest} never matters: ICMP has no ports"))
        if dest.kind == "agents":
            out += selector_problems(dest.selector, policy.groups, here)
            if acl.narrowed:
                out.append(Problem(here, "http and mcp_tools apply to ports meshd serves on nodes "
                                   "(meshctl serve), not to agents' own addresses: write a rule of its own"))
    out += _hidden_target_ports(acl.to, at + ("to",))
    if acl.protocol is not None and all(d.kind == "service" for d in acl.to):
        out.append(
            Problem(at + ("protocol",), "protocol never matters: every destination is a service, "
                    "which brings its own protocol")
        )
    if acl.narrowed:
        out += _narrowing_problems(acl, policy, at)
    return out


def _narrowing_problems(acl: Acl, policy: Policy, at: Path) -> list[Problem]:
    """``http``/``mcp_tools`` judge HTTP requests: the rule must be about TCP, and say each thing once."""
    field = "http" if acl.http is not None else "mcp_tools"
    used = set(acl.protocol or ("tcp",)) if any(d.kind != "service" for d in acl.to) else set()
    for dest in acl.to:
        if dest.kind == "service" and dest.name in policy.services:
            used |= set(policy.services[dest.name].protocol)
    out = []
    if used - {"tcp"}:
        other = "/".join(sorted(used - {"tcp"}))
        out.append(Problem(at + (field,), f"{field} narrows HTTP requests, which travel over TCP, but this rule "
                           f"also allows {other}: write the {other} part as a rule of its own"))
    out += _duplicates([m.text() for m in acl.http or ()], at + ("http",))
    out += _duplicates(acl.mcp_tools or (), at + ("mcp_tools",))
    return out


def _hidden_target_ports(dests: Sequence[Destination], at: Path) -> list[Problem]:
    by_target: dict[tuple[str, str], list[int]] = {}
    for j, dest in enumerate(dests):
        if dest.kind != "service":
            by_target.setdefault((dest.kind, dest.name), []).append(j)
    out = []
    for indexes in by_target.values():
        if len(indexes) < 2:
            continue
        ranges = [dests[j].ports or ALL_PORTS for j in indexes]
        for problem in _hidden_ports(ranges, (), [dests[j] for j in indexes]):
            if "listed twice" in problem.message:
                continue  # already reported by the duplicate check
            (k,) = problem.path
            assert isinstance(k, int)
            out.append(Problem(at + (indexes[k],), problem.message))
    return out


def _known(names: Iterable[str]) -> str:
    known = sorted(names)
    return f" (known: {', '.join(known)})" if known and len(known) <= 12 else ""


def _delegation_problems(delegation: Delegation, at: Path) -> list[Problem]:
    out = _duplicates(delegation.nodes, at + ("nodes",))
    out += _hidden_scopes(delegation.scopes, at + ("scopes",))
    patterns = delegation.requires_grant
    if isinstance(patterns, bool):
        return out
    if not patterns:
        out.append(Problem(at + ("requires_grant",), "an empty list never requires a grant: write false, "
                           "or leave requires_grant out"))
    out += _hidden_scopes(patterns, at + ("requires_grant",), "pattern")
    held = ", ".join(str(s) for s in delegation.scopes)
    for k, pattern in enumerate(patterns):
        if not any(scopes_overlap(pattern, s) for s in delegation.scopes):
            out.append(Problem(at + ("requires_grant", k), f"pattern {pattern} never matters: no scope this "
                               f"delegation grants ({held}) overlaps it, so no request it covers can need it"))
    return out


def _hidden_scopes(scopes: Sequence[Scope], at: Path, what: str = "scope") -> list[Problem]:
    """A scope within another listed one never matters (a duplicate: reported at its second occurrence)."""
    out = []
    for k, scope in enumerate(scopes):
        for m, other in enumerate(scopes):
            if m == k or not scope.within(other) or (scope == other and m > k):
                continue
            message = f"{what} {scope} is listed twice" if scope == other else (
                f"{what} {scope} never matters: {other} already covers it")
            out.append(Problem(at + (k,), message))
            break
    return out


def selector_problems(selector: Selector, groups: Mapping[str, Sequence[str]], at: Path) -> list[Problem]:
    """Unknown groups, and fields that contradict or hide each other (module docstring)."""
    s = selector
    given = {k for k in ("principal", "group", "owner", "tag", "node", "via", "agent", "scope", "authorized")
             if getattr(s, k) is not None}
    if not given:
        return [Problem(at, "an empty selector matches everyone: write {via: any} if that is meant")]
    out: list[Problem] = []
    members: frozenset[str] | None = None
    if s.group is not None:
        if s.group in groups:
            members = frozenset(groups[s.group])
        else:
            out.append(Problem(at + ("group",), f"unknown group {s.group!r}" + _known(groups)))
    agent_fields = [f for f in ("agent", "scope", "authorized") if f in given]
    if s.via == "direct":
        for f in agent_fields:
            what = _AGENT_ONLY[f]
            out.append(Problem(at + (f,), f"{f} can never match with via: direct: only agents {what}, "
                               "and via: direct selects devices acting without an agent"))
    elif s.via == "any" and agent_fields:
        out.append(Problem(at + ("via",), f"via: any never matters: {agent_fields[0]} only matches agents "
                           "(write via: agent, or leave via out)"))
    elif s.scope == _ANY_SCOPE and (s.via == "agent" or s.agent is not None or s.authorized is not None):
        because = ("via: agent" if s.via == "agent" else "agent" if s.agent is not None
                   else f"authorized: {s.authorized}")
        out.append(Problem(at + ("scope",), f'scope "*:*" never matters: every agent holds a scope, '
                           f"so it adds nothing to {because}"))
    if s.principal is not None and members is not None:
        if s.principal in members:
            out.append(Problem(at + ("group",), f"group {s.group!r} never matters: "
                               f"principal {s.principal} is a member of it"))
        else:
            out.append(Problem(at + ("principal",), f"can never match: principal {s.principal} "
                               f"is not a member of group {s.group!r}"))
    if s.owner is not None and s.tag is not None:
        out.append(Problem(at + ("tag",), "can never match: a node is either owned (owner) or tagged (tag), "
                           "never both"))
    if s.via == "direct":
        out += _direct_problems(s, members, at)
    return out


_AGENT_ONLY = {
    "agent": "have agent names",
    "scope": "have scopes",
    "authorized": "are authorized by a grant or a delegation",
}


def _direct_problems(s: Selector, members: frozenset[str] | None, at: Path) -> list[Problem]:
    """Acting directly, a node's principal is its owner; a tagged node has none."""
    out: list[Problem] = []
    if s.tag is not None:
        for f in ("principal", "group"):
            if getattr(s, f) is not None:
                out.append(Problem(at + (f,), f"can never match: a tagged node acting directly "
                                   f"(via: direct) has no principal{'' if f == 'principal' else ', so no group'}"))
        return out
    if s.owner is not None and s.principal is not None:
        if s.owner == s.principal:
            out.append(Problem(at + ("principal",), "principal never matters: acting directly, a device's "
                               "principal is its owner, which owner already names"))
        else:
            out.append(Problem(at + ("principal",), "can never match: acting directly, a device's principal "
                               f"is its owner ({s.owner})"))
    elif s.owner is not None and members is not None:
        if s.owner in members:
            out.append(Problem(at + ("group",), f"group {s.group!r} never matters: acting directly, the "
                               f"principal is the owner {s.owner}, a member of it"))
        else:
            out.append(Problem(at + ("group",), f"can never match: acting directly, the principal is the "
                               f"owner {s.owner}, who is not a member of group {s.group!r}"))
    return out


def flow_source_problems(source: FlowSource, groups: Mapping[str, Sequence[str]], at: Path) -> list[Problem]:
    """A test's ``from`` must describe an identity that can exist."""
    s = source
    given = [k for k in ("principal", "group", "owner", "tag", "node", "via", "agent", "scope", "scopes",
                         "authorized") if getattr(s, k) is not None]
    if not given:
        return [Problem(at, "describe the source: give a principal, group, owner, tag, node, agent or scope")]
    out: list[Problem] = []
    if s.group is not None and s.group not in groups:
        out.append(Problem(at + ("group",), f"unknown group {s.group!r}" + _known(groups)))
    if s.group is not None and s.principal is not None:
        out.append(Problem(at + ("group",), "a principal's groups follow from `groups`: give principal or "
                           "group, not both"))
    if s.scope is not None and s.scopes is not None:
        out.append(Problem(at + ("scopes",), "give scope or scopes, not both"))
    if s.owner is not None and s.tag is not None:
        out.append(Problem(at + ("tag",), "a node is either owned (owner) or tagged (tag), never both"))
    if s.effective_via == "direct":
        for f in ("agent", "scope", "scopes"):
            if getattr(s, f) is not None:
                out.append(Problem(at + (f,), f"acting directly (via: direct) an identity has no {f}: "
                                   "only agents do"))
        if s.authorized is not None:
            out.append(Problem(at + ("authorized",), "acting directly (via: direct) an identity is not "
                               "authorized by a grant or a delegation: only agents are"))
        for f in ("principal", "group"):
            if getattr(s, f) is not None and s.tag is not None:
                out.append(Problem(at + (f,), "a tagged node acting directly has no principal"
                                   f"{'' if f == 'principal' else ', so no group'}"))
        if s.group is not None and s.owner is not None:
            out.append(Problem(at + ("group",), "acting directly, a device's principal is its owner, whose "
                               "groups follow from `groups`: give owner or group, not both"))
        elif s.principal is not None and s.owner is not None and s.principal != s.owner:
            out.append(Problem(at + ("principal",), f"acting directly, a device's principal is its owner "
                               f"({s.owner})"))
    else:
        if s.principal is None and s.group is None:
            out.append(Problem(at, "an agent acts for a principal: add principal (or group)"))
        if not s.all_scopes:
            out.append(Problem(at, "an agent holds at least one scope: add scope"))
    return out


def flow_destination_problems(
    dest: Destination, protocol: str, services: Mapping[str, Service], at: Path
) -> list[Problem]:
    """A test's ``to`` is one flow: a known destination and exactly one port (none for ICMP)."""
    here = at
    if dest.kind == "service" and dest.name not in services:
        return [Problem(here, f"unknown service {dest.name!r}" + _known(services))]
    if dest.kind == "agents":
        found = selector_problems(dest.selector, {}, here)
        if found:
            return found
    if protocol == "icmp":
        if dest.ports is not None:
            return [Problem(here, f"the port of {dest} never matters: ICMP has no ports")]
        return []
    if dest.ports is None:
        known_ports = services[dest.name].ports if dest.kind == "service" else ()
        example = f"{dest}:{known_ports[0] if known_ports else 443}"
        return [Problem(here, f"a test is one flow: name its port, e.g. {example}")]
    if dest.ports.lo != dest.ports.hi:
        return [Problem(here, f"a test is one flow: name one port, not {dest.ports}")]
    return []
