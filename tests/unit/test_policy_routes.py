"""Identity-based routes: who gets which gateway for which prefix (meshcore.policy.routes)."""

from __future__ import annotations

import pytest

from meshcore.policy import (
    AgentIdentity,
    Gateway,
    Identities,
    NodeIdentity,
    compile_node_routes,
    explain_address,
    explain_route,
    load_policy,
    offer_users,
    route_for,
    routes_of,
)
from meshcore.scopes import parse_scope

POLICY = """\
groups:
  sre: [li@acme.com]
routes:
  - from: {group: sre, via: agent}
    to: 0.0.0.0/0
    via: [node:exit-a, node:exit-b]
  - from: {scope: "billing:*"}
    to: [0.0.0.0/0, 10.20.0.0/16]
    via: [node:exit-b, tag:billing-gw]
  - from: {group: sre, via: agent}
    to: 0.0.0.0/0
    via: node:exit-b
"""

GATEWAYS = {
    "exit-a": Gateway("exit-a", routes=("0.0.0.0/0", "::/0")),
    "exit-b": Gateway("exit-b", routes=("0.0.0.0/0", "::/0")),
    "gw-2": Gateway("gw-2", frozenset({"billing-gw"}), ("10.20.0.0/16",)),
    "gw-1": Gateway("gw-1", frozenset({"billing-gw"}), ("10.0.0.0/8",)),
    "gw-x": Gateway("gw-x", frozenset({"billing-gw"}), ("192.0.2.0/24",)),  # offers something else
}


def _node(name: str, i: int, **kw: object) -> NodeIdentity:
    return NodeIdentity(name=name, ipv4=f"100.64.{i}.1", ipv6=f"fd00::{i:x}:1", **kw)  # type: ignore[arg-type]


def _agent(agent_id: str, node: str, i: int, j: int, principal: str, scope: str) -> AgentIdentity:
    return AgentIdentity(id=agent_id, name=agent_id, principal=principal, scopes=(parse_scope(scope),), node=node,
                         ipv4=f"100.64.{i}.{j}", ipv6=f"fd00::{i:x}:{j:x}")


IDS = Identities.build(
    [_node("host", 1, owner="li@acme.com"), _node("exit-a", 2), _node("exit-b", 3), _node("gw-1", 4),
     _node("gw-2", 5), _node("gw-x", 6)],
    [_agent("sre-1", "host", 1, 2, "li@acme.com", "ops:run"),
     _agent("bill-1", "host", 1, 3, "ann@acme.com", "billing:read"),
     _agent("plain-1", "host", 1, 4, "ann@acme.com", "docs:read")],
)
P = load_policy(POLICY)


def test_an_sre_agent_exits_through_a_then_b_and_the_later_rule_for_the_same_prefix_does_not_count() -> None:
    choices = routes_of(P, IDS.actors["agent:sre-1"], GATEWAYS)
    assert [(c.prefix, c.gateways, c.rule) for c in choices] == [("0.0.0.0/0", ("exit-a", "exit-b"), 0)]


def test_a_tag_stands_for_its_nodes_in_name_order_that_offer_the_prefix() -> None:
    choices = routes_of(P, IDS.actors["agent:bill-1"], GATEWAYS)
    assert [(c.prefix, c.gateways) for c in choices] == [
        ("0.0.0.0/0", ("exit-b",)),  # gw-1/gw-2 offer no default route
        ("10.20.0.0/16", ("exit-b", "gw-1", "gw-2")),  # an exit covers every prefix; gw-x offers another
    ]


def test_identities_no_rule_matches_get_no_route_nor_does_the_node_acting_directly() -> None:
    assert routes_of(P, IDS.actors["agent:plain-1"], GATEWAYS) == ()
    assert routes_of(P, IDS.actors["node:host"], GATEWAYS) == ()  # rule 0 says via: agent


def test_longest_prefix_wins_between_an_exit_and_a_subnet_route() -> None:
    choices = routes_of(P, IDS.actors["agent:bill-1"], GATEWAYS)
    assert route_for(choices, "10.20.3.4").prefix == "10.20.0.0/16"  # type: ignore[union-attr]
    assert route_for(choices, "203.0.113.10").prefix == "0.0.0.0/0"  # type: ignore[union-attr]
    assert route_for(choices, "2001:db8::1") is None  # no IPv6 route in this policy


def test_a_rule_whose_gateways_offer_nothing_leaves_the_prefix_to_later_rules() -> None:
    only_b = {"exit-b": GATEWAYS["exit-b"]}
    choices = routes_of(P, IDS.actors["agent:sre-1"], only_b)
    assert [(c.gateways, c.rule) for c in choices] == [(("exit-b",), 0)]
    choices = routes_of(P, IDS.actors["agent:sre-1"], {"gw-1": GATEWAYS["gw-1"]})
    assert choices == ()


def test_a_node_never_routes_its_own_identities_through_itself() -> None:
    ids = IDS.with_agent(_agent("sre-on-a", "exit-a", 2, 9, "li@acme.com", "ops:run"))
    choices = routes_of(P, ids.actors["agent:sre-on-a"], GATEWAYS)
    assert [c.gateways for c in choices] == [("exit-b",)]


def test_the_sender_compiles_only_its_own_identities() -> None:
    routes = compile_node_routes(P, IDS, "host", GATEWAYS)
    assert set(routes.senders) == {"agent:sre-1", "agent:bill-1"}
    assert routes.gateways == {"exit-a", "exit-b", "gw-1", "gw-2"}
    assert not routes.grants4 and not routes.clients  # host is no gateway


def test_each_gateway_grants_exactly_the_sources_whose_routes_list_it_backups_included() -> None:
    a = compile_node_routes(P, IDS, "exit-a", GATEWAYS)
    assert a.grants4 == {("100.64.1.2", "0.0.0.0/0")} and a.clients == {"host"}
    b = compile_node_routes(P, IDS, "exit-b", GATEWAYS)
    assert b.grants4 == {("100.64.1.2", "0.0.0.0/0"), ("100.64.1.3", "0.0.0.0/0"), ("100.64.1.3", "10.20.0.0/16")}
    g2 = compile_node_routes(P, IDS, "gw-2", GATEWAYS)
    assert g2.grants4 == {("100.64.1.3", "10.20.0.0/16")}
    assert compile_node_routes(P, IDS, "gw-x", GATEWAYS).grants4 == frozenset()


def test_a_route_can_carry_only_grant_authorized_agents() -> None:
    policy = load_policy("routes:\n  - from: {principal: li@acme.com, authorized: grant}\n    to: 0.0.0.0/0\n"
                         "    via: node:exit-a\n", "policy.yaml")
    granted = AgentIdentity(id="sre-g", name="sre-g", principal="li@acme.com", scopes=(parse_scope("ops:run"),),
                            node="host", ipv4="100.64.1.9", ipv6="fd00::1:9", authorized="grant")
    ids = IDS.with_agent(granted)
    assert [c.gateways for c in routes_of(policy, ids.actors["agent:sre-g"], GATEWAYS)] == [("exit-a",)]
    assert routes_of(policy, ids.actors["agent:sre-1"], GATEWAYS) == ()  # li's agent on the node's word
    assert compile_node_routes(policy, ids, "exit-a", GATEWAYS).grants4 == {("100.64.1.9", "0.0.0.0/0")}
    assert str(explain_address(policy, "principal=li@acme.com,scope=ops:run,authorized=grant", "192.0.2.1")) == (
        "route: {principal: li@acme.com, via: agent, authorized: grant, scope: \"ops:run\"} via node:exit-a: "
        "routes[0] at policy.yaml:2:5: from {principal: li@acme.com, via: agent, authorized: grant} to [0.0.0.0/0] "
        "via [node:exit-a]")
    assert explain_address(policy, "principal=li@acme.com,scope=ops:run", "192.0.2.1").choice is None


def test_no_routes_section_compiles_to_nothing() -> None:
    empty = compile_node_routes(load_policy("acls: []\n"), IDS, "exit-a", GATEWAYS)
    assert not empty.senders and not empty.grants4 and not empty.clients


def test_routes_list_names_the_rules_that_use_each_offer() -> None:
    users = offer_users(P, GATEWAYS)
    assert users[("exit-a", "0.0.0.0/0")] == (0,)
    assert users[("exit-b", "0.0.0.0/0")] == (0, 1, 2)
    assert users[("gw-1", "10.0.0.0/8")] == (1,)
    assert users[("exit-a", "::/0")] == ()
    assert users[("gw-x", "192.0.2.0/24")] == ()


def test_explain_names_the_route_its_gateways_and_the_rule_line() -> None:
    decision = explain_route(P, IDS.actors["agent:bill-1"], "10.20.0.7", "bill-1", GATEWAYS)
    assert str(decision) == ("route: bill-1 via exit-b, then gw-1, then gw-2: routes[1] at policy.yaml:7:5: "
                             'from {via: agent, scope: "billing:*"} to [0.0.0.0/0, 10.20.0.0/16] via [node:exit-b, tag:billing-gw]')
    written = explain_route(P, IDS.actors["agent:bill-1"], "10.20.0.7", "bill-1")
    assert written.choice is not None and written.choice.gateways == ("node:exit-b", "tag:billing-gw")
    none = explain_route(P, IDS.actors["agent:plain-1"], "10.20.0.7", "plain-1", GATEWAYS)
    assert none.choice is None and str(none).startswith("no route: plain-1: no routes rule matches")


@pytest.mark.parametrize(("text", "message"), [
    ("routes:\n  - from: {tag: ci}\n    to: [10.20.0.0/16, 10.20.0.0/16]\n    via: node:gw\n",
     "policy.yaml:3:24: routes[0].to[1]: 10.20.0.0/16 is listed twice"),
    ("routes:\n  - from: {tag: ci}\n    to: 10.0.0.0/8\n    via: [node:gw, node:gw]\n",
     "policy.yaml:4:20: routes[0].via[1]: node:gw is listed twice"),
    ("routes:\n  - from: {tag: ci}\n    to: 10.0.0.0/8\n    via: []\n",
     "policy.yaml:4:10: routes[0].via: "),
])
def test_bad_route_rules_are_refused_with_their_location(text: str, message: str) -> None:
    from meshcore.errors import InvalidInput

    with pytest.raises(InvalidInput) as err:
        load_policy(text)
    assert str(err.value).startswith(message)
