"""Agents as destinations: ``'{principal: P, scope: S}:PORT'`` in a ``to``, compiled per node, judged per address."""

from __future__ import annotations

import re

import pytest

from meshcore.errors import PolicyError
from meshcore.policy import AgentIdentity, Identities, NodeIdentity, compile_node_filter, identity_delta, load_policy
from meshcore.policy.compile import apply_delta
from meshcore.scopes import parse_scopes
from meshd.mesh.firewall import render_table

POLICY = load_policy("""
acls:
  - from: {principal: nikita@acme.com, via: agent, scope: "task:call"}
    to: ['{principal: nikita@acme.com, scope: "task:serve"}:9000']
  - from: {principal: nikita@acme.com, via: agent, scope: "task:call"}
    to: ["tag:agents:9000"]
""", "policy.yaml")
A = NodeIdentity(name="a", tags=frozenset({"agents"}), ipv4="100.64.0.1", ipv6="fd00::1")
C = NodeIdentity(name="c", tags=frozenset({"agents"}), ipv4="100.64.0.65", ipv6="fd00:1::1")


def agent(agent_id: str, scope: str, node: NodeIdentity, n: int) -> AgentIdentity:
    base4, base6 = node.ipv4.rsplit(".", 1)[0], node.ipv6.rsplit(":", 1)[0]
    return AgentIdentity(id=agent_id, name=agent_id, principal="nikita@acme.com", scopes=parse_scopes([scope]),
                         node=node.name, ipv4=f"{base4}.{int(node.ipv4.rsplit('.', 1)[1]) + n}", ipv6=f"{base6}:{n + 1:x}")


SERVER, CALLER = agent("s1", "task:serve", A, 1), agent("c1", "task:call", C, 1)
IDS = Identities.build([A, C], [SERVER, CALLER])


def test_a_rule_to_agents_admits_only_to_the_matching_agents_of_this_node_and_one_to_the_node_only_to_it() -> None:
    nf = compile_node_filter(POLICY, IDS, "a")
    assert nf.allows(CALLER.ipv4, "tcp", 9000, to=SERVER.ipv4)
    assert nf.allows(CALLER.ipv4, "tcp", 9000)  # the node's own port 9000 (the second rule)
    assert not nf.allows(CALLER.ipv4, "tcp", 9000, to="100.64.0.3"), "an address no matching agent holds"
    assert not nf.allows(CALLER.ipv4, "tcp", 9001, to=SERVER.ipv4)
    text = render_table(nf, "wg0")
    assert f"ip daddr {A.ipv4} ip saddr @" in text and "ip daddr @src_" in text
    assert f"ip6 daddr {A.ipv6} ip6 saddr @" in text


def test_an_agent_born_later_joins_the_destination_set_as_the_delta_says() -> None:
    before = compile_node_filter(POLICY, Identities.build([A, C], [CALLER]), "a")
    ids = Identities.build([A, C], [CALLER, SERVER])
    delta = identity_delta(before, ids.actor_of(SERVER), "add")
    assert apply_delta(before, delta) == compile_node_filter(POLICY, ids, "a")
    other_node = identity_delta(compile_node_filter(POLICY, ids, "c"), ids.actor_of(SERVER), "add")
    assert other_node.empty, "a server on node a is in no destination set of node c"


def test_the_nodes_addresses_are_part_of_what_replaces_its_table() -> None:
    moved = NodeIdentity(name="a", tags=A.tags, ipv4="100.64.0.129", ipv6="fd00:2::1")
    assert compile_node_filter(POLICY, IDS, "a").rules_hash != \
        compile_node_filter(POLICY, Identities.build([moved, C], [CALLER]), "a").rules_hash


@pytest.mark.parametrize(("to", "message"), [
    ("'{principal: x@y.z, via: direct}:9000'", "names agents (via: agent)"),
    ("'{principal: x@y.z, scopez: \"a:b\"}:9000'", "unknown key 'scopez'"),
    ("'{principal: x@y.z'", "expected agents as"),
    ("'{group: nope}:80'", "unknown group 'nope'"),
    ("'{principal: x@y.z}:99999'", "port"),
])
def test_a_malformed_agents_destination_is_refused_where_it_is_written(to: str, message: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(message)) as refused:
        load_policy(f"acls:\n  - from: {{principal: a@b.c}}\n    to: [{to}]\n", "policy.yaml")
    assert str(refused.value).startswith("policy.yaml:3:")
