"""Decisions for single flows: the policy's ``tests``, ``policy explain``, and the reference semantics.

A flow is allowed when at least one acl allows it — its ``from`` matches the
source and one of its ``to`` entries covers the destination, protocol and
port — and denied otherwise (default deny). Acls are a union: no rule
denies, so order never changes a verdict. A :class:`Decision` names the
lowest-numbered allowing rule, and lists the others in ``also``.

The compiled filters (:mod:`.compile`) must agree with :func:`decide` on
every flow; the unit tests check that on generated meshes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import ValidationError

from ..errors import InvalidInput
from ..problems import render_path
from ..yamlsource import validation_problems
from .checks import flow_destination_problems, flow_source_problems
from .fields import Destination, NodeSpec, Protocol, parse_destination
from .identities import Actor, NodeIdentity
from .model import FlowSource, Policy
from .plan import plan_policy
from .routes import Gateway, RouteDecision, explain_route
from .sources import SourceClass, source_class

if TYPE_CHECKING:
    from .requests import RequestDecision

__all__ = [
    "Decision",
    "PolicyTestFailure",
    "Target",
    "actor_for",
    "decide",
    "decide_flow",
    "explain",
    "flow_targets",
    "run_tests",
]

DEFAULT_DENY = "no rule allows this: default deny"
MAX_HINTS = 5
"""Near misses listed for a denial; a broad selector can match hundreds of rules."""


@dataclass(frozen=True)
class Target:
    """A destination node as rules see it: its name (None when hypothetical) and its tags."""

    name: str | None = None
    tags: frozenset[str] = frozenset()
    agent: Actor | None = None
    """An agent as the destination (at its own address), hypothetical like a test's source."""

    @classmethod
    def of_node(cls, node: NodeIdentity) -> Target:
        return cls(node.name, node.tags)

    @classmethod
    def of_spec(cls, spec: NodeSpec) -> Target:
        """A service's ``tag:X`` member is "some node tagged X"; ``node:Y`` is node Y."""
        return cls(spec.name) if spec.kind == "node" else cls(None, frozenset({spec.name}))

    def __str__(self) -> str:
        if self.agent is not None:
            return f"agent {self.agent.key if self.agent.key != 'hypothetical' else self.agent.principal}"
        if self.name is not None:
            return f"node:{self.name}"
        return ",".join(f"tag:{t}" for t in sorted(self.tags)) or "(an untagged node)"


@dataclass(frozen=True)
class Decision:
    """The verdict for one flow and the rule that made it.

    ``rule_index`` is the lowest-numbered acl that allows the flow (None:
    denied); ``also`` the other acls that allow it too. ``hints`` explain a
    denial: first rules that would allow the flow but for how the agent was
    authorized (``authorized: grant``, and an agent started on its node's
    word), then rules that match the source but not the destination, or the
    other way round.
    """

    allowed: bool
    rule_index: int | None
    rule_text: str
    flow: str
    also: tuple[int, ...] = ()
    hints: tuple[str, ...] = ()

    @property
    def verdict(self) -> Literal["allow", "deny"]:
        return "allow" if self.allowed else "deny"

    def __str__(self) -> str:
        return f"{self.verdict}: {self.flow}: {self.rule_text}"


def _flow_text(source: Actor | FlowSource | str, target: Target, protocol: Protocol, port: int | None) -> str:
    who = source if isinstance(source, str) else source.text() if isinstance(source, FlowSource) else source.key
    where = f"{target} {protocol}" + ("" if port is None else f"/{port}")
    return f"{who} -> {where}"


def _rule_label(policy: Policy, index: int) -> str:
    where = policy.where("acls", index)
    return f"acls[{index}]" + (f" at {where}" if where else "")


def decide(
    policy: Policy,
    source: Actor,
    dest: Target | NodeIdentity,
    port: int | None,
    protocol: Protocol = "tcp",
    *,
    source_text: str | None = None,
) -> Decision:
    """Is a flow from ``source`` to ``dest`` on ``protocol``/``port`` allowed? (``port`` None for ICMP)."""
    plan = plan_policy(policy)
    target = Target.of_node(dest) if isinstance(dest, NodeIdentity) else dest
    flow = _flow_text(source_text or source, target, protocol, port)
    grants = plan.grants_for(target.name, target.tags) if target.agent is None else [
        g for g in plan.to_agents if g.agents is not None and source_class(g.agents, policy.groups).matches(target.agent)]
    covering = {g.acl for g in grants if g.covers(protocol, port)}
    matching = {i for i, name in enumerate(plan.acl_sources) if plan.sources[name].matches(source)}
    allowing = sorted(covering & matching)
    if allowing:
        first = allowing[0]
        return Decision(True, first, f"{_rule_label(policy, first)}: {policy.acls[first].text()}", flow,
                        also=tuple(allowing[1:]))
    authorization = {i for i in covering - matching if _only_authorization(plan.sources[plan.acl_sources[i]], source)}
    hints = [_authorization_hint(policy, i, source) for i in sorted(authorization)]
    hints += [f"{_rule_label(policy, i)} matches the source but not this destination, protocol or port"
              for i in sorted(matching - covering)]
    hints += [f"{_rule_label(policy, i)} covers this destination but not the source "
              f"(from {policy.acls[i].source.text()})" for i in sorted(covering - matching - authorization)]
    if len(hints) > MAX_HINTS:
        hints = hints[:MAX_HINTS] + [f"and {len(hints) - MAX_HINTS} more rules like these"]
    return Decision(False, None, DEFAULT_DENY, flow, hints=tuple(hints))


def _only_authorization(source: SourceClass, actor: Actor) -> bool:
    """The rule's selector misses this agent only for how it was authorized (grant or delegation)."""
    return (source.authorized is not None and actor.via == "agent" and actor.authorized != source.authorized
            and source.matches(dataclasses.replace(actor, authorized=source.authorized)))


_STARTED = {"grant": "started with its principal's grant", "delegation": "started on its node's word, by a delegation"}


def _authorization_hint(policy: Policy, index: int, actor: Actor) -> str:
    selector = policy.acls[index].source
    wanted = selector.authorized or "delegation"
    have = _STARTED[actor.authorized] if actor.authorized else "authorized by neither"
    fix = "; start it with a grant: meshctl agent run --grant" if wanted == "grant" else ""
    return (f"{_rule_label(policy, index)} would allow this agent had it been {_STARTED[wanted]}, "
            f"but it was {have} (from {selector.text()}){fix}")


def actor_for(source: FlowSource) -> Actor:
    """The hypothetical identity a test's ``from`` describes (see :class:`FlowSource`)."""
    tags = frozenset({source.tag} if source.tag else ())
    groups = frozenset({source.group} if source.group else ())
    if source.effective_via == "direct":
        owner = source.owner if source.owner is not None else source.principal if source.tag is None else None
        return Actor(key="hypothetical", via="direct", principal=owner, node=source.node, owner=owner,
                     tags=tags, groups=groups)
    return Actor(key="hypothetical", via="agent", principal=source.principal, node=source.node,
                 owner=source.owner, tags=tags, agent=source.agent, scopes=tuple(sorted(set(source.all_scopes))),
                 groups=groups, authorized=source.effective_authorized)


def decide_flow(policy: Policy, source: FlowSource, to: Destination, protocol: Protocol = "tcp") -> Decision:
    """A flow as a test writes it: ``to`` a service (each of its nodes), ``tag:X:PORT`` or ``node:Y:PORT``.

    A service with several members is allowed only if every member is; the
    decision shown is the first member's denial, or the first member's allow.
    The destination is hypothetical, like the source: ``tag:db`` is "some node
    tagged db", so rules that name particular nodes (``node:db-1``) do not
    apply to it — test those with ``node:db-1:PORT``.
    """
    actor = actor_for(source)
    port = None if protocol == "icmp" or to.ports is None else to.ports.lo
    decisions = [decide(policy, actor, t, port, protocol, source_text=source.text()) for t in flow_targets(policy, to)]
    return next((d for d in decisions if not d.allowed), decisions[0])


def flow_targets(policy: Policy, to: Destination) -> list[Target]:
    """The hypothetical nodes a test's ``to`` stands for (each member of a service)."""
    if to.kind == "service":
        return [Target.of_spec(spec) for spec in policy.services[to.name].nodes]
    if to.kind == "agents":
        fields = to.selector.model_dump(exclude_none=True, mode="json")
        return [Target(agent=actor_for(FlowSource.model_validate({**fields, "via": "agent"})))]
    return [Target(to.name) if to.kind == "node" else Target(None, frozenset({to.name}))]


@dataclass(frozen=True)
class PolicyTestFailure:
    """A test whose verdict is not the expected one; ``str()`` is one line for the user."""

    index: int
    location: str
    expected: Literal["allow", "deny"]
    decision: Decision | RequestDecision

    def __str__(self) -> str:
        why = (f"allowed by {self.decision.rule_text}" if self.decision.allowed
               else self.decision.rule_text + "".join(f"; {h}" for h in self.decision.hints))
        return (f"{self.location}: tests[{self.index}]: expected {self.expected}, got "
                f"{self.decision.verdict} ({self.decision.flow}): {why}")


def run_tests(policy: Policy) -> list[PolicyTestFailure]:
    """Run the policy's own ``tests``; an empty list means they all pass."""
    failures = []
    from .requests import decide_request_flow

    for i, test in enumerate(policy.tests):
        decision: Decision | RequestDecision = (
            decide_request_flow(policy, test.source, test.to, test.method, test.path, test.tool)
            if test.is_request else decide_flow(policy, test.source, test.to, test.protocol))
        if decision.verdict != test.expect:
            location = policy.where("tests", i) or render_path(("tests", i))
            failures.append(PolicyTestFailure(i, location, test.expect, decision))
    return failures


def explain(policy: Policy, source: str | Mapping[str, Any], to: str, protocol: Protocol = "tcp", *,
            method: str | None = None, path: str | None = None,
            tool: str | None = None) -> Decision | RequestDecision:
    """``policy explain --from SOURCE --to DEST``: the decision and the rule that made it.

    With ``method``, ``path`` or ``tool``, the decision for one request to a
    port meshd serves (:func:`~.requests.decide_request_flow`).

    ``source`` describes one identity like a test's ``from``: a mapping, a
    YAML flow mapping ``{principal: nikita@acme.com, via: agent, scope:
    db:read}``, or ``principal=nikita@acme.com,via=agent,scope=db:read``
    (add ``authorized=grant`` for an agent started with its principal's
    grant; an agent is ``delegation``-authorized unless it says so).
    ``to`` is ``db:5432``, ``tag:monitoring:9100`` or ``node:NAME:PORT``.
    """
    flow_source = _parse_source(source, policy.groups)
    try:
        dest = parse_destination(to)
    except ValueError as exc:
        raise InvalidInput(f"--to: {exc}") from exc
    problems = flow_destination_problems(dest, protocol, policy.services, ())
    if problems:
        raise InvalidInput(f"--to: {problems[0].message}")
    if method is None and path is None and tool is None:
        return decide_flow(policy, flow_source, dest, protocol)
    from .fields import check_method, check_path, check_tool_name
    from .requests import decide_request_flow

    if protocol != "tcp":
        raise InvalidInput("--method, --path and --tool are about HTTP requests, which travel over TCP")
    try:
        checked = (None if method is None else check_method(method), None if path is None else check_path(path),
                   None if tool is None else check_tool_name(tool))
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    return decide_request_flow(policy, flow_source, dest, *checked)


def explain_address(policy: Policy, source: str | Mapping[str, Any], address: str,
                    gateways: Mapping[str, Gateway] | None = None) -> RouteDecision:
    """``policy explain --to ADDRESS``: the route ``source`` takes to an address off the mesh (see :mod:`.routes`)."""
    try:
        ipaddress.ip_address(address)
    except ValueError as exc:
        raise InvalidInput(f"--to: {address!r} is not an IP address") from exc
    flow_source = _parse_source(source, policy.groups)
    return explain_route(policy, actor_for(flow_source), address, flow_source.text(), gateways)


def _key_values(text: str) -> dict[str, Any]:
    """``principal=P,via=agent,scope=db:read,scope=web:read``: a repeated scope makes ``scopes``."""
    data: dict[str, Any] = {}
    scopes: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = (x.strip() for x in part.partition("="))
        if not eq:
            raise InvalidInput(f"--from: expected key=value pairs, got {part!r}")
        if key == "scope":
            scopes.append(value)
        elif key in data:
            raise InvalidInput(f"--from: {key} is given twice")
        else:
            data[key] = value
    if len(scopes) == 1:
        data["scope"] = scopes[0]
    elif scopes:
        data["scopes"] = scopes
    return data


def _parse_source(source: str | Mapping[str, Any], groups: Mapping[str, Sequence[str]]) -> FlowSource:
    data: Any = source
    if isinstance(source, str):
        text = source.strip()
        if text.startswith("{"):
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise InvalidInput(f"--from: not a YAML mapping: {text!r}") from exc
        else:
            data = _key_values(text)
    try:
        flow_source = FlowSource.model_validate(data)
    except ValidationError as exc:
        first = validation_problems(exc, FlowSource)[0]
        raise InvalidInput(f"--from: {render_path(first.path) + ': ' if first.path else ''}{first.message}") from exc
    problems = flow_source_problems(flow_source, groups, ())
    if problems:
        first = problems[0]
        raise InvalidInput(f"--from: {render_path(first.path) + ': ' if first.path else ''}{first.message}")
    return flow_source
