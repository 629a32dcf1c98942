"""Targeted distribution of agent identities: which nodes need an agent (meshcore.policy.audience).

The property tests are the proof: for random meshes and policies, every node
whose compiled filter or routes differ with and without an agent is in that
agent's audience.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshcore.errors import IdmeshError
from meshcore.policy import (
    AgentIdentity,
    Gateway,
    Identities,
    NodeIdentity,
    Policy,
    compile_node_filter,
    compile_node_routes,
    load_policy,
)
from meshcore.policy.audience import Audience, AudienceNode, LiveAgents, Reach, Resend
from meshcore.scopes import parse_scopes
from tests.unit.test_policy_golden import FILES, _identities

SEED = textwrap.dedent("""\
    groups:
      sre: [li@acme.com]
    services:
      db: {nodes: [tag:db], ports: [5432]}
      db-admin: {nodes: [tag:db], ports: [5433]}
    acls:
      - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
        to: [db]
      - from: {principal: nikita@acme.com, via: direct}
        to: [db, db-admin]
      - from: {group: sre}
        to: ["tag:monitoring:9100"]
    routes:
      - from: {group: sre, via: agent}
        to: 0.0.0.0/0
        via: node:exit-eu
      - from: {scope: "billing:*"}
        to: 10.20.0.0/16
        via: tag:billing-gw
    """)

NODES = [
    AudienceNode("db-1", tags=frozenset({"db"})),
    AudienceNode("db-2", tags=frozenset({"db"})),
    AudienceNode("mon-1", tags=frozenset({"monitoring"})),
    AudienceNode("exit-eu"),
    AudienceNode("gw-1", tags=frozenset({"billing-gw"})),
    AudienceNode("agents-1", tags=frozenset({"agents"})),
    AudienceNode("laptop", owner="nikita@acme.com"),
    AudienceNode("ci-1", tags=frozenset({"ci"})),
]


def S(*names: str) -> frozenset[str]:
    return frozenset(names)


def seed() -> Audience:
    return Audience(load_policy(SEED, "seed.yaml"), NODES)


# -- (a) the agent's own node ---------------------------------------------------------------------------------

def test_the_agents_own_node_always_needs_it() -> None:
    audience = seed()
    for node in NODES:
        for principal, scopes in (("nikita@acme.com", ("db:read",)), ("ann@acme.com", ("x:y",))):
            nodes = audience.nodes_for(principal, scopes, node.name)
            assert nodes is None or node.name in nodes
            assert audience.wants(node.name, principal, scopes, node.name)
            assert node.name in audience.reach(principal, scopes, node.name)


def test_an_agent_no_rule_matches_goes_to_its_own_node_only() -> None:
    assert seed().nodes_for("ann@acme.com", ("docs:read",), "agents-1") == S("agents-1")


def test_an_agent_on_a_node_the_audience_does_not_know_yet_still_reaches_its_own_node() -> None:
    nodes = seed().nodes_for("nikita@acme.com", ("db:read",), "new-box")
    assert nodes == S("new-box", "db-1", "db-2")


# -- (b) a node no rule could admit the agent to -------------------------------------------------------------

def test_nodes_no_rule_admits_the_agent_to_do_not_get_it() -> None:
    audience = seed()
    nodes = audience.nodes_for("nikita@acme.com", ("db:read",), "agents-1")
    assert nodes is not None
    for name in ("ci-1", "laptop", "exit-eu", "gw-1"):
        assert name not in nodes
        assert not audience.wants(name, "nikita@acme.com", ("db:read",), "agents-1")


def test_a_direct_only_rule_never_sends_an_agent() -> None:
    # Nikita's own devices reach db-admin; an agent of hers with db:write (no read) goes nowhere
    assert seed().nodes_for("nikita@acme.com", ("db:write",), "laptop") == S("laptop")


# -- (c) destinations of matching rules --------------------------------------------------------------------

def test_a_matching_rule_sends_the_agent_to_its_destination_nodes() -> None:
    audience = seed()
    assert audience.nodes_for("nikita@acme.com", ("db:read",), "agents-1") == S("agents-1", "db-1", "db-2")
    assert audience.nodes_for("nikita@acme.com", ("db:*",), "laptop") == S("laptop", "db-1", "db-2")


def test_a_group_rule_reaches_its_members_agents() -> None:
    nodes = seed().nodes_for("li@acme.com", ("ops:run",), "agents-1")
    assert nodes == S("agents-1", "mon-1", "exit-eu")  # sre's monitoring rule and sre's route


def test_selector_fields_about_the_agents_node_are_honoured() -> None:
    policy = load_policy(textwrap.dedent("""\
        acls:
          - from: {tag: agents, principal: a@b.c}
            to: ["tag:db:1"]
          - from: {owner: a@b.c, via: agent}
            to: ["node:mon-1:2"]
          - from: {node: ci-1, via: agent}
            to: ["node:exit-eu:3"]
        """), "p.yaml")
    audience = Audience(policy, NODES)
    assert audience.nodes_for("a@b.c", ("x:y",), "agents-1") == S("agents-1", "db-1", "db-2")
    assert audience.nodes_for("z@b.c", ("x:y",), "laptop") == S("laptop")
    audience.add_node(AudienceNode("laptop", owner="a@b.c"))
    assert audience.nodes_for("z@b.c", ("x:y",), "laptop") == S("laptop", "mon-1")
    assert audience.nodes_for("z@b.c", ("x:y",), "ci-1") == S("ci-1", "exit-eu")


def test_name_and_authorization_narrow_only_when_given() -> None:
    policy = load_policy(textwrap.dedent("""\
        acls:
          - from: {agent: coder, principal: a@b.c}
            to: ["tag:db:1"]
          - from: {authorized: grant}
            to: ["tag:monitoring:2"]
        """), "p.yaml")
    audience = Audience(policy, NODES)
    assert audience.nodes_for("a@b.c", ("x:y",), "agents-1") == S("agents-1", "db-1", "db-2", "mon-1")
    assert audience.nodes_for("a@b.c", ("x:y",), "agents-1", "other", authorized="delegation") == S("agents-1")
    assert audience.nodes_for("a@b.c", ("x:y",), "agents-1", "coder", authorized="grant") == S(
        "agents-1", "db-1", "db-2", "mon-1")


def test_a_tag_every_node_carries_is_every_node() -> None:
    audience = Audience(load_policy("acls:\n  - from: {principal: a@b.c}\n    to: ['tag:all:1']\n", "p.yaml"),
                        [AudienceNode(f"n{i}", tags=frozenset({"all"})) for i in range(5)])
    assert audience.nodes_for("a@b.c", ("x:y",), "n0") is None
    assert audience.reach("a@b.c", ("x:y",), "n0").nodes is None


def test_nodes_joining_and_leaving_change_the_audience_without_a_rebuild() -> None:
    audience = seed()
    audience.add_node(AudienceNode("db-3", tags=frozenset({"db"})))
    assert audience.nodes_for("nikita@acme.com", ("db:read",), "agents-1") == S("agents-1", "db-1", "db-2", "db-3")
    audience.remove_node("db-1")
    assert audience.nodes_for("nikita@acme.com", ("db:read",), "agents-1") == S("agents-1", "db-2", "db-3")
    audience.add_node(AudienceNode("db-2", tags=frozenset({"ci"})))  # re-enrolled with another tag
    assert audience.nodes_for("nikita@acme.com", ("db:read",), "agents-1") == S("agents-1", "db-3")


# -- (d) gateways of identity routes ------------------------------------------------------------------------

def test_route_gateways_get_the_agents_they_may_forward_for() -> None:
    audience = seed()
    assert audience.nodes_for("ann@acme.com", ("billing:read",), "agents-1") == S("agents-1", "gw-1")
    assert "exit-eu" in (audience.nodes_for("li@acme.com", ("x:y",), "laptop") or ())
    # the route is for agents: li's device acting directly is not an agent, and ann is not in sre
    assert "exit-eu" not in (audience.nodes_for("ann@acme.com", ("x:y",), "laptop") or ())


# -- (e) agents as destinations -------------------------------------------------------------------------------

AGENT_SERVERS = textwrap.dedent("""\
    acls:
      - from: {principal: nikita@acme.com, via: agent, scope: "task:call"}
        to: ['{principal: nikita@acme.com, scope: "task:serve"}:9000']
      - from: {principal: li@acme.com, via: agent}
        to: ['{tag: gpu, scope: "model:*"}:8000-8100']
      - from: {principal: ann@acme.com, via: agent}
        to: ['{owner: ann@acme.com}:7000', '{node: ci-1}:7001']
    """)


def test_sources_of_an_agents_destination_go_wherever_such_agents_may_run() -> None:
    nodes = NODES + [AudienceNode("gpu-1", tags=frozenset({"gpu", "agents"})), AudienceNode("ann-pc", owner="ann@acme.com")]
    audience = Audience(load_policy(AGENT_SERVERS, "p.yaml"), nodes)
    # no node constraint: the rule (with the caller in its source set) is on every node
    assert audience.nodes_for("nikita@acme.com", ("task:call",), "laptop") is None
    # the served agents themselves only matter to their own node
    assert audience.nodes_for("nikita@acme.com", ("task:serve",), "agents-1") == S("agents-1")
    assert audience.nodes_for("li@acme.com", ("x:y",), "laptop") == S("laptop", "gpu-1")
    assert audience.nodes_for("ann@acme.com", ("x:y",), "laptop") == S("laptop", "ann-pc", "ci-1")


# -- the real compiler: golden files and random meshes -------------------------------------------------------

def _differs(policy: Policy, before: Identities, after: Identities, node: str, served: frozenset[int],
             gateways: dict[str, Gateway]) -> bool:
    return (compile_node_filter(policy, before, node, served) != compile_node_filter(policy, after, node, served)
            or compile_node_routes(policy, before, node, gateways) != compile_node_routes(policy, after, node, gateways))


def _assert_sound(policy: Policy, ids: Identities, agent: AgentIdentity, served: dict[str, frozenset[int]],
                  gateways: dict[str, Gateway], *, told: bool) -> None:
    """Every node whose compiled state depends on ``agent`` is in its audience (``told``: name and
    authorization given to the audience; else it has to assume they match)."""
    without = ids.without_agent(agent.id) if agent.id in ids.agents else ids
    with_it = ids if agent.id in ids.agents else ids.with_agent(agent)
    audience = Audience(policy, ids.nodes.values())
    nodes = audience.nodes_for(agent.principal, agent.scopes, agent.node, agent.name if told else None,
                               authorized=agent.authorized if told else None)
    for name in ids.nodes:
        if _differs(policy, without, with_it, name, served.get(name, frozenset()), gateways):
            assert nodes is None or name in nodes, (
                f"node {name} compiles differently with agent {agent.id} but is not in its audience {nodes}")
            assert audience.wants(name, agent.principal, agent.scopes, agent.node)
            assert name in audience.reach(agent.principal, agent.scopes, agent.node)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_golden_meshes_every_node_that_compiles_an_agent_gets_it(path: Path) -> None:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    policy = load_policy(doc["policy"], path.name)
    ids = _identities(doc)
    served = {spec["name"]: frozenset(spec.get("serves") or ()) for spec in doc.get("nodes") or ()}
    gateways = {n: Gateway(n, node.tags, ("0.0.0.0/0", "::/0", "10.0.0.0/8")) for n, node in ids.nodes.items()}
    for agent in ids.agents.values():
        _assert_sound(policy, ids, agent, served, gateways, told=True)
        _assert_sound(policy, ids, agent, served, gateways, told=False)


PRINCIPALS = ["a@x.io", "b@x.io", "c@x.io"]
TAGS = ["t1", "t2", "t3"]
NAMES = [f"n{i}" for i in range(6)]
SCOPES = ["db:read", "db:write", "db:*", "web:read", "*:read", "*:*"]


@st.composite
def selectors(draw: st.DrawFn, for_agents: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    who = draw(st.sampled_from(["principal", "group", "none"]))
    if who == "principal":
        out["principal"] = draw(st.sampled_from(PRINCIPALS))
    elif who == "group":
        out["group"] = draw(st.sampled_from(["g1", "g2"]))
    where = draw(st.sampled_from(["owner", "tag", "node", "none", "none"]))
    if where == "owner":
        out["owner"] = draw(st.sampled_from(PRINCIPALS))
    elif where == "tag":
        out["tag"] = draw(st.sampled_from(TAGS))
    elif where == "node":
        out["node"] = draw(st.sampled_from(NAMES))
    if draw(st.booleans()):
        out["scope"] = draw(st.sampled_from(SCOPES[:-1]))
    if draw(st.integers(0, 5)) == 0:
        out["agent"] = draw(st.sampled_from(["coder", "bot"]))
    if draw(st.integers(0, 4)) == 0:
        out["authorized"] = draw(st.sampled_from(["grant", "delegation"]))
    if not for_agents and not {"scope", "agent", "authorized"} & set(out):
        out["via"] = draw(st.sampled_from(["agent", "direct", "any"]))
    return out


def _flow(selector: dict[str, Any]) -> str:
    return "{" + ", ".join(f'{k}: "{v}"' for k, v in selector.items()) + "}"


@st.composite
def destinations(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["tag", "node", "service", "agents"]))
    port = draw(st.sampled_from(["", ":80", ":8080"]))
    if kind == "tag":
        return f"tag:{draw(st.sampled_from(TAGS))}{port}"
    if kind == "node":
        return f"node:{draw(st.sampled_from(NAMES))}{port}"
    if kind == "service":
        return draw(st.sampled_from(["svc", "web"]))
    return f"{_flow(draw(selectors(for_agents=True)))}:{draw(st.sampled_from(['80', '9000']))}"


ROUTE_SOURCES: list[dict[str, Any]] = [{"principal": PRINCIPALS[0]}, {"via": "agent"}, {"scope": "db:*"},
                                       {"group": "g1", "via": "agent"}]


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    acls = []
    for _ in range(draw(st.integers(1, 4))):
        acl: dict[str, Any] = {"from": draw(selectors()), "to": draw(st.lists(destinations(), min_size=1,
                                                                          max_size=2, unique=True))}
        if draw(st.integers(0, 5)) == 0 and not any(d.startswith("{") for d in acl["to"]):
            acl["http"] = [{"methods": ["GET"]}]
        acls.append(acl)
    routes = [{"from": draw(st.one_of(selectors(), st.sampled_from(ROUTE_SOURCES))), "to": draw(st.sampled_from(["0.0.0.0/0", "10.0.0.0/8"])),
               "via": draw(st.lists(st.sampled_from([f"tag:{t}" for t in TAGS] + [f"node:{n}" for n in NAMES]),
                                    min_size=1, max_size=2, unique=True))}
              for _ in range(draw(st.integers(0, 2)))]
    return {
        "groups": {"g1": PRINCIPALS[:2], "g2": PRINCIPALS[1:]},
        "services": {"svc": {"nodes": [f"tag:{draw(st.sampled_from(TAGS))}"], "ports": [80]},
                     "web": {"nodes": [f"node:{draw(st.sampled_from(NAMES))}"], "ports": [8080]}},
        "acls": acls,
        "routes": routes,
    }


@st.composite
def meshes(draw: st.DrawFn) -> tuple[Identities, AgentIdentity, dict[str, frozenset[int]], dict[str, Gateway]]:
    count = draw(st.integers(2, len(NAMES)))
    nodes = []
    for i in range(count):
        kind = draw(st.sampled_from(["owned", "tagged", "bare"]))
        nodes.append(NodeIdentity(
            name=NAMES[i], owner=draw(st.sampled_from(PRINCIPALS)) if kind == "owned" else None,
            tags=frozenset(draw(st.sets(st.sampled_from(TAGS), min_size=1, max_size=2)) if kind == "tagged" else ()),
            ipv4=f"100.64.{i}.1", ipv6=f"fd00::{i:x}:1"))

    def agent(k: int) -> AgentIdentity:
        i = draw(st.integers(0, count - 1))
        return AgentIdentity(
            id=f"a{k}", name=draw(st.sampled_from(["coder", "bot", f"a{k}"])),
            principal=draw(st.sampled_from(PRINCIPALS)),
            scopes=parse_scopes(draw(st.sets(st.sampled_from(SCOPES), min_size=1, max_size=2))),
            node=NAMES[i], ipv4=f"100.64.{i}.{k + 2}", ipv6=f"fd00::{i:x}:{k + 2:x}",
            authorized=draw(st.sampled_from(["grant", "delegation"])))

    others = [agent(k) for k in range(draw(st.integers(0, 3)))]
    subject = agent(9)
    served = {n.name: frozenset(draw(st.sets(st.sampled_from([80, 8080]), max_size=2))) for n in nodes}
    offers = st.sampled_from([("0.0.0.0/0", "::/0"), ("10.0.0.0/8",), ("0.0.0.0/0", "10.0.0.0/8"), ()])
    gateways = {n.name: Gateway(n.name, n.tags, draw(offers)) for n in nodes if draw(st.integers(0, 3))}
    return Identities.build(nodes, others), subject, served, gateways


def _valid(data: dict[str, Any]) -> Policy:
    try:
        return Policy.model_validate(data)
    except (IdmeshError, ValueError):
        assume(False)
        raise


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=policies(), mesh=meshes(), told=st.booleans())
def test_every_node_whose_compiled_state_depends_on_an_agent_is_in_its_audience(
        data: dict[str, Any], mesh: tuple[Identities, AgentIdentity, dict[str, frozenset[int]], dict[str, Gateway]],
        told: bool) -> None:
    policy = _valid(data)
    ids, subject, served, gateways = mesh
    _assert_sound(policy, ids, subject, served, gateways, told=told)


def test_the_property_check_has_teeth() -> None:
    """A node that compiles the agent differently is seen as such; one that does not is not."""
    policy = load_policy(SEED, "seed.yaml")
    ids = Identities.build(
        [NodeIdentity(name="db-1", tags=frozenset({"db"}), ipv4="100.64.0.1", ipv6="fd00::1"),
         NodeIdentity(name="agents-1", tags=frozenset({"agents"}), ipv4="100.64.1.1", ipv6="fd00::1:1")])
    agent = AgentIdentity(id="r1", name="r1", principal="nikita@acme.com", scopes=parse_scopes(["db:read"]),
                          node="agents-1", ipv4="100.64.1.2", ipv6="fd00::1:2")
    assert _differs(policy, ids, ids.with_agent(agent), "db-1", frozenset(), {})
    other = dataclasses.replace(agent, principal="z@acme.com")
    assert not _differs(policy, ids, ids.with_agent(other), "db-1", frozenset(), {})


# -- the controller's index of live agents -------------------------------------------------------------------

def test_live_agents_birth_death_and_a_stream_opening() -> None:
    live = LiveAgents(seed())
    born = live.add("r1", "nikita@acme.com", ("db:read",), "agents-1")
    assert isinstance(born, Reach) and set(born.pick({n.name: n.name for n in NODES})) == S("agents-1", "db-1", "db-2")
    live.add("r2", "nikita@acme.com", ("db:read",), "laptop")
    live.add("x1", "ann@acme.com", ("docs:read",), "laptop")
    assert sorted(live.of_node("db-1")) == ["r1", "r2"]
    assert sorted(live.of_node("laptop")) == ["r2", "x1"]
    assert live.of_node("ci-1") == []
    assert live.groups == 2
    gone = live.remove("r1")
    assert gone is not None and set(gone.pick({n.name: n.name for n in NODES})) == S("agents-1", "db-1", "db-2")
    assert live.remove("r1") is None and len(live) == 2


def test_a_death_after_a_policy_change_reaches_every_node_that_may_hold_the_agent() -> None:
    live = LiveAgents(seed())
    live.add("r1", "nikita@acme.com", ("db:read",), "agents-1")
    narrower = load_policy(SEED.replace("to: [db]\n", "to: ['tag:monitoring:1']\n", 1), "p.yaml")
    resend = live.rebase(Audience(narrower, NODES))
    assert [(r.nodes, r.agents) for r in resend] == [(frozenset({"mon-1"}), ("r1",))]
    assert live.of_node("db-1") == [] and live.of_node("mon-1") == ["r1"]
    gone = live.remove("r1")
    assert gone is not None and {"db-1", "db-2", "mon-1", "agents-1"} <= {n for n in (gone.nodes or ())} | {gone.home}


def test_a_node_re_enrolled_with_a_new_tag_gets_what_it_now_needs() -> None:
    live = LiveAgents(seed())
    live.add("r1", "nikita@acme.com", ("db:read",), "agents-1")
    assert live.node_changed(AudienceNode("new-1")) == []  # a new node no rule reaches: nothing to send
    assert live.node_changed(AudienceNode("db-9", tags=frozenset({"db"}))) == [Resend(S("db-9"), ("r1",))]
    assert live.node_changed(AudienceNode("ci-1", tags=frozenset({"db"}))) == [Resend(frozenset({"ci-1"}), ("r1",))]
    assert sorted(live.of_node("ci-1")) == ["r1"]
    death = live.remove("r1")
    assert death is not None and "ci-1" in (death.nodes or ())


def test_agents_of_a_re_tagged_node_go_where_their_new_tags_take_them() -> None:
    policy = load_policy("acls:\n  - from: {tag: agents, via: agent}\n    to: ['tag:db:1']\n", "p.yaml")
    live = LiveAgents(Audience(policy, NODES))
    assert live.add("c1", "a@b.c", ("x:y",), "ci-1").nodes == frozenset()
    resend = live.node_changed(AudienceNode("ci-1", tags=frozenset({"ci", "agents"})))
    assert resend == [Resend(frozenset({"db-1", "db-2"}), ("c1",))]
    assert sorted(live.of_node("db-1")) == ["c1"]
    death = live.remove("c1")
    assert death is not None and death.home == "ci-1" and death.nodes == S("db-1", "db-2")


def test_an_agent_born_into_a_group_after_a_policy_change_is_resent_when_the_policy_changes_back() -> None:
    """Found by the property below: a group's ``delivered`` (for deaths) is not what its later members hold."""
    wide = load_policy("acls:\n  - from: {agent: coder}\n    to: ['tag:t1:80']\n", "a.yaml")
    narrow = load_policy("acls:\n  - from: {principal: a@x.io, owner: a@x.io, agent: coder}\n"
                         "    to: ['tag:t1:80']\n", "b.yaml")
    nodes = [AudienceNode("n0"), AudienceNode("n3", tags=frozenset({"t1"}))]
    live = LiveAgents(Audience(wide, nodes))
    assert live.add("old", "a@x.io", ("db:read",), "n0").nodes == S("n3")
    live.rebase(Audience(narrow, nodes))
    assert live.add("young", "a@x.io", ("db:read",), "n0").nodes == S()
    (resend,) = live.rebase(Audience(wide, nodes))
    assert resend.nodes == S("n3") and sorted(resend.agents) == ["old", "young"]


def test_live_agents_agree_with_the_audience_for_every_node() -> None:
    audience = seed()
    live = LiveAgents(audience)
    agents = [(f"a{i}", principal, scopes, where.name) for i, (principal, scopes, where) in enumerate(
        (principal, scopes, where) for principal in ("nikita@acme.com", "li@acme.com", "ann@acme.com")
        for scopes in (("db:read",), ("billing:read", "x:y"), ("x:y",)) for where in NODES)]
    for agent_id, principal, scopes, home in agents:
        live.add(agent_id, principal, scopes, home)
    for node in NODES:
        expected = sorted(a for a, p, s, n in agents if audience.wants(node.name, p, s, n))
        assert sorted(live.of_node(node.name)) == expected


# -- node churn and policy changes: what was sent always covers what is needed ---------------------------

SIGNATURES = [(p, (s,), n) for p in PRINCIPALS for s in SCOPES[:4] for n in NAMES + ["elsewhere"]]


def _audience_node(draw: Callable[..., Any], name: str) -> AudienceNode:
    kind = draw(st.sampled_from(["owned", "tagged", "bare"]))
    return AudienceNode(name, owner=draw(st.sampled_from(PRINCIPALS)) if kind == "owned" else None,
                        tags=frozenset(draw(st.sets(st.sampled_from(TAGS), min_size=1, max_size=2)))
                        if kind == "tagged" else frozenset())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=policies(), st_data=st.data())
def test_an_audience_changed_node_by_node_answers_as_one_built_afresh(data: dict[str, Any],
                                                                      st_data: st.DataObject) -> None:
    policy = _valid(data)
    draw = st_data.draw
    nodes = {name: _audience_node(draw, name) for name in NAMES[:3]}
    audience = Audience(policy, nodes.values())
    for _ in range(draw(st.integers(1, 8))):
        for principal, scopes, where in SIGNATURES[::7]:  # fill the caches the changes must keep right
            audience.nodes_for(principal, scopes, where)
        name = draw(st.sampled_from(NAMES))
        if name in nodes and draw(st.booleans()):
            del nodes[name]
            audience.remove_node(name)
        else:
            nodes[name] = _audience_node(draw, name)
            audience.add_node(nodes[name])
        fresh = Audience(policy, nodes.values())
        everyone = set(nodes)
        for principal, scopes, where in SIGNATURES:  # None is every node: a set of all of them says the same
            changed, built = (a.nodes_for(principal, scopes, where) for a in (audience, fresh))
            assert (everyone | {where} if changed is None else changed) == (
                everyone | {where} if built is None else built)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=policies(), later=policies(), st_data=st.data())
def test_every_node_that_needs_a_live_agent_has_been_sent_it(data: dict[str, Any], later: dict[str, Any],
                                                             st_data: st.DataObject) -> None:
    """Births, deaths, nodes joining, re-tagged and leaving, streams reopening and a policy change, in any
    order: a node that needs a live agent was sent it (at birth, on its stream's start, or in a Resend),
    and a death goes to every node that was sent the agent."""
    policies_ = [_valid(data), _valid(later)]
    draw = st_data.draw
    nodes = {name: _audience_node(draw, name) for name in NAMES[:3]}
    live = LiveAgents(Audience(policies_[0], nodes.values()))
    sent: dict[str, set[str]] = {}  # agent -> the nodes that were sent it (and hold it)
    attrs: dict[str, tuple[str, tuple[str, ...], str]] = {}

    def send(nodes_: frozenset[str] | None, agent_ids: Iterable[str]) -> None:
        for agent_id in agent_ids:
            sent[agent_id] |= set(nodes) if nodes_ is None else set(nodes_) & set(nodes)

    for step in range(draw(st.integers(1, 25))):
        op = draw(st.sampled_from(["birth", "birth", "death", "join", "retag", "leave", "reopen", "policy"]))
        if op == "birth" and nodes:
            agent_id = f"a{step}"
            principal, scopes = draw(st.sampled_from(PRINCIPALS)), tuple(draw(st.sets(st.sampled_from(SCOPES),
                                                                                      min_size=1, max_size=2)))
            home = draw(st.sampled_from(sorted(nodes)))
            reach = live.add(agent_id, principal, scopes, home)
            sent[agent_id], attrs[agent_id] = {home}, (principal, scopes, home)
            send(reach.nodes, [agent_id])
        elif op == "death" and sent:
            agent_id = draw(st.sampled_from(sorted(sent)))
            death = live.remove(agent_id)
            assert death is not None and all(n in death for n in sent.pop(agent_id))
            del attrs[agent_id]
        elif op in ("join", "retag"):
            absent = [n for n in NAMES if n not in nodes]
            name = draw(st.sampled_from(absent if op == "join" and absent else sorted(nodes) or NAMES))
            node = _audience_node(draw, name)
            joined = name not in nodes
            early = joined and draw(st.booleans())  # its stream opened on a replica that had not heard of it
            if early:
                early_agents = live.of_node(name)
            nodes[name] = node
            if early:
                send(frozenset((name,)), early_agents)
            for resend in live.node_changed(node):
                send(resend.nodes, resend.agents)
            if joined and not early:  # its stream opens
                send(frozenset((name,)), live.of_node(name))
        elif op == "leave" and nodes:
            name = draw(st.sampled_from(sorted(nodes)))
            del nodes[name]
            for agent_id in live.forget_node(name):
                del sent[agent_id], attrs[agent_id]
            for holders in sent.values():
                holders.discard(name)
        elif op == "reopen" and nodes:
            name = draw(st.sampled_from(sorted(nodes)))
            for holders in sent.values():
                holders.discard(name)  # a full AgentUpdate replaces what it held
            send(frozenset((name,)), live.of_node(name))
        elif op == "policy":
            policies_.reverse()
            for resend in live.rebase(Audience(policies_[0], nodes.values())):
                send(resend.nodes, resend.agents)
        audience = live.audience
        for agent_id, (principal, scopes, home) in attrs.items():
            for name in nodes:
                if audience.wants(name, principal, scopes, home):
                    assert name in sent[agent_id], f"after {op}: {name} needs {agent_id} and was never sent it"
        for name in nodes:
            assert sorted(live.of_node(name)) == sorted(
                a for a, (p, s, h) in attrs.items() if audience.wants(name, p, s, h))
