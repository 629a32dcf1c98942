"""The compiler: stable set names, hashes, incremental deltas, and agreement with decide()."""

from __future__ import annotations

import hashlib
import textwrap
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshcore.errors import InvalidInput, PolicyError
from meshcore.policy import (
    AddressSet,
    AgentIdentity,
    Authorized,
    Identities,
    NodeIdentity,
    Policy,
    apply_delta,
    compile_mesh,
    compile_node_filter,
    decide,
    identity_delta,
    load_policy,
    set_name,
    validate_policy,
)
from meshcore.policy.fields import PROTOCOLS
from meshcore.scopes import parse_scopes

POLICY = textwrap.dedent("""\
    groups:
      sre: [li@acme.com]
    services:
      db: {nodes: [tag:db], ports: [5432]}
    acls:
      - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
        to: [db]
      - from: {group: sre}
        to: ["tag:db:9100"]
    """)


def node(name: str, i: int, owner: str | None = None, tags: tuple[str, ...] = ()) -> NodeIdentity:
    return NodeIdentity(name=name, owner=owner, tags=frozenset(tags), ipv4=f"100.64.{i}.1", ipv6=f"fd00::{i:x}:1")


def agent(agent_id: str, principal: str, scopes: list[str], on: str, i: int, slot: int,
          authorized: Authorized = "delegation") -> AgentIdentity:
    return AgentIdentity(id=agent_id, name=agent_id, principal=principal, scopes=parse_scopes(scopes), node=on,
                         ipv4=f"100.64.{i}.{slot}", ipv6=f"fd00::{i:x}:{slot:x}", authorized=authorized)


MESH = Identities.build(
    [node("db-1", 0, tags=("db",)), node("agents-1", 1, tags=("agents",)), node("li-laptop", 2, owner="li@acme.com")],
    [agent("r1", "nikita@acme.com", ["db:read"], "agents-1", 1, 2)],
)


def test_set_names_come_from_the_selector_not_from_the_rule_position() -> None:
    policy = load_policy(POLICY, "p.yaml")
    reordered = Policy.model_validate({**policy.to_data(), "acls": list(reversed(policy.to_data()["acls"]))})
    assert compile_node_filter(policy, MESH, "db-1") == compile_node_filter(reordered, MESH, "db-1")
    names = set(compile_node_filter(policy, MESH, "db-1").sets)
    assert names == {set_name('{principal: nikita@acme.com, via: agent, scope: "db:read"}'),
                     set_name("{group: sre}")}


def test_equal_selectors_written_differently_share_one_set() -> None:
    policy = load_policy(textwrap.dedent("""\
        acls:
          - from: {principal: a@b.c, via: agent, scope: "db:read"}
            to: ["tag:db:1"]
          - from: {scope: "db:read", principal: a@b.c}
            to: ["tag:db:2"]
        """), "p.yaml")
    (rule,) = compile_node_filter(policy, MESH, "db-1").rules
    assert [str(p) for p in rule.ports] == ["1-2"] and rule.acls == (0, 1)


def test_identity_joining_changes_set_elements_not_rules() -> None:
    policy = load_policy(POLICY, "p.yaml")
    before = compile_node_filter(policy, MESH, "db-1")
    joined = MESH.with_agent(agent("r2", "nikita@acme.com", ["db:*"], "agents-1", 1, 3))
    after = compile_node_filter(policy, joined, "db-1")
    assert after.rules == before.rules and after.rules_hash == before.rules_hash
    assert after.digest != before.digest
    assert "100.64.1.3" in after.sets[set_name('{principal: nikita@acme.com, via: agent, scope: "db:read"}')].v4


def test_rules_hash_changes_with_the_policy() -> None:
    policy = load_policy(POLICY, "p.yaml")
    wider = load_policy(POLICY.replace("tag:db:9100", "tag:db:9100-9101"), "p.yaml")
    assert compile_node_filter(policy, MESH, "db-1").rules_hash != compile_node_filter(wider, MESH, "db-1").rules_hash


def test_node_no_rule_targets_has_an_empty_filter() -> None:
    node_filter = compile_node_filter(load_policy(POLICY, "p.yaml"), MESH, "li-laptop")
    assert node_filter.rules == () and node_filter.sets == {}
    assert not node_filter.allows("100.64.1.2", "tcp", 5432)


def test_filter_allows_exactly_the_members_of_a_rules_set() -> None:
    node_filter = compile_node_filter(load_policy(POLICY, "p.yaml"), MESH, "db-1")
    assert node_filter.allows("100.64.1.2", "tcp", 5432)
    assert node_filter.allows("fd00::1:2", "tcp", 5432)
    assert not node_filter.allows("100.64.1.2", "tcp", 9100)
    assert not node_filter.allows("100.64.1.2", "udp", 5432)
    assert node_filter.allows("100.64.2.1", "tcp", 9100)


def test_identity_delta_adds_only_to_sets_whose_selector_matches() -> None:
    policy = load_policy(POLICY, "p.yaml")
    node_filter = compile_node_filter(policy, MESH, "db-1")
    newcomer = agent("w1", "nikita@acme.com", ["db:write"], "agents-1", 1, 4)
    assert identity_delta(node_filter, MESH.actor_of(newcomer), "add").empty
    reader = agent("r3", "li@acme.com", ["db:read"], "agents-1", 1, 5)
    delta = identity_delta(node_filter, MESH.actor_of(reader), "add")
    assert delta.add == {set_name("{group: sre}"): AddressSet(frozenset({"100.64.1.5"}), frozenset({"fd00::1:5"}))}


def test_identity_delta_removes_the_identitys_addresses() -> None:
    policy = load_policy(POLICY, "p.yaml")
    node_filter = compile_node_filter(policy, MESH, "db-1")
    delta = identity_delta(node_filter, MESH.actors["agent:r1"], "remove")
    after = apply_delta(node_filter, delta)
    assert after == compile_node_filter(policy, MESH.without_agent("r1"), "db-1")
    assert after.rules_hash == node_filter.rules_hash


def test_delta_for_another_node_is_refused() -> None:
    policy = load_policy(POLICY, "p.yaml")
    delta = identity_delta(compile_node_filter(policy, MESH, "db-1"), MESH.actors["agent:r1"], "remove")
    with pytest.raises(InvalidInput):
        apply_delta(compile_node_filter(policy, MESH, "li-laptop"), delta)


def test_mesh_identity_delta_reaches_only_nodes_whose_sets_match() -> None:
    policy = load_policy(POLICY, "p.yaml")
    mesh = compile_mesh(policy, MESH)
    reader = MESH.actor_of(agent("r9", "nikita@acme.com", ["db:read"], "agents-1", 1, 9))
    deltas = mesh.identity_delta(reader, "add")
    assert set(deltas) == {"db-1"}
    assert apply_delta(mesh.filters["db-1"], deltas["db-1"]) == compile_node_filter(
        policy, MESH.with_agent(agent("r9", "nikita@acme.com", ["db:read"], "agents-1", 1, 9)), "db-1")


def test_a_copy_with_other_rules_is_compiled_from_its_own_rules() -> None:
    policy = load_policy(POLICY, "p.yaml")
    assert compile_node_filter(policy, MESH, "db-1").rules
    assert compile_node_filter(policy.model_copy(update={"acls": ()}), MESH, "db-1").rules == ()


def test_compile_is_deterministic_and_needs_nothing_but_its_inputs() -> None:
    policy_a = load_policy(POLICY, "a.yaml")
    policy_b = load_policy(POLICY, "b.yaml")
    assert compile_mesh(policy_a, MESH).filters == compile_mesh(policy_b, MESH).filters
    assert [f.digest for f in compile_mesh(policy_a, MESH).filters.values()] == \
        [f.digest for f in compile_mesh(policy_b, MESH).filters.values()]


def test_scope_selector_set_holds_exactly_the_agents_whose_scopes_overlap() -> None:
    mesh = Identities.build(
        [node("db-1", 0, tags=("db",)), node("box", 1, tags=("agents",))],
        [agent("both", "a@b.c", ["db:read", "*:write"], "box", 1, 2),  # in two scope buckets
         agent("any-write", "a@b.c", ["*:write"], "box", 1, 3),
         agent("web", "a@b.c", ["web:read"], "box", 1, 4)],
    )
    policy = load_policy("acls:\n  - from: {scope: 'db:*'}\n    to: ['tag:db:1']\n"
                         "  - from: {scope: 'db:read'}\n    to: ['tag:db:2']\n", "p.yaml")
    sets = compile_node_filter(policy, mesh, "db-1").sets
    assert sets[set_name('{via: agent, scope: "db:*"}')].v4 == {"100.64.1.2", "100.64.1.3"}
    assert sets[set_name('{via: agent, scope: "db:read"}')].v4 == {"100.64.1.2"}


AUTHORIZED = textwrap.dedent("""\
    services:
      db-admin: {nodes: [tag:db], ports: [5433]}
    acls:
      - from: {principal: nikita@acme.com, via: agent, authorized: grant, scope: "db:write"}
        to: [db-admin]
      - from: {principal: nikita@acme.com, authorized: delegation}
        to: ["tag:db:8080"]
      - from: {authorized: grant}
        to: ["tag:db:9000"]
    """)
GRANT_SETS = {
    "writer": set_name('{principal: nikita@acme.com, via: agent, authorized: grant, scope: "db:write"}'),
    "node-word": set_name("{principal: nikita@acme.com, via: agent, authorized: delegation}"),
    "any-grant": set_name("{via: agent, authorized: grant}"),
}


def _granted_mesh() -> Identities:
    return MESH.with_agent(agent("g1", "nikita@acme.com", ["db:write"], "agents-1", 1, 3, "grant")).with_agent(
        agent("d1", "nikita@acme.com", ["db:write"], "agents-1", 1, 4))


def test_agents_authorized_differently_fall_into_different_sets() -> None:
    node_filter = compile_node_filter(load_policy(AUTHORIZED, "p.yaml"), _granted_mesh(), "db-1")
    assert set(node_filter.sets) == set(GRANT_SETS.values())
    members = {k: node_filter.sets[n].v4 for k, n in GRANT_SETS.items()}
    assert members == {"writer": {"100.64.1.3"}, "node-word": {"100.64.1.2", "100.64.1.4"},
                       "any-grant": {"100.64.1.3"}}
    assert node_filter.allows("100.64.1.3", "tcp", 5433) and not node_filter.allows("100.64.1.4", "tcp", 5433)
    assert not node_filter.allows("100.64.1.1", "tcp", 8080)  # the node itself is authorized by neither


def test_a_selector_without_authorized_keeps_its_text_and_set_name() -> None:
    policy = load_policy(POLICY, "p.yaml")
    assert policy.acls[0].source.text() == '{principal: nikita@acme.com, via: agent, scope: "db:read"}'
    assert set_name(policy.acls[0].source.text()) == "src_" + hashlib.sha256(
        b'{principal: nikita@acme.com, via: agent, scope: "db:read"}').hexdigest()[:12]
    # and such a selector matches agents however they were authorized
    granted = MESH.with_agent(agent("g1", "nikita@acme.com", ["db:read"], "agents-1", 1, 3, "grant"))
    assert compile_node_filter(policy, granted, "db-1").allows("100.64.1.3", "tcp", 5432)


def test_identity_delta_puts_an_agent_into_the_set_of_its_authorization() -> None:
    policy = load_policy(AUTHORIZED, "p.yaml")
    node_filter = compile_node_filter(policy, MESH, "db-1")
    for authorized, sets in (("grant", {"writer", "any-grant"}), ("delegation", {"node-word"})):
        newcomer = agent("n1", "nikita@acme.com", ["db:write"], "agents-1", 1, 9, authorized)  # type: ignore[arg-type]
        delta = identity_delta(node_filter, MESH.actor_of(newcomer), "add")
        assert set(delta.add) == {GRANT_SETS[k] for k in sets}
        assert apply_delta(node_filter, delta) == compile_node_filter(policy, MESH.with_agent(newcomer), "db-1")
        mesh_delta = compile_mesh(policy, MESH).identity_delta(MESH.actor_of(newcomer), "add")
        assert set(mesh_delta["db-1"].add) == {GRANT_SETS[k] for k in sets}


def test_an_agent_must_be_authorized_by_grant_or_delegation() -> None:
    with pytest.raises(InvalidInput, match="authorized must be grant or delegation"):
        agent("x", "a@b.c", ["db:read"], "agents-1", 1, 9, "node")  # type: ignore[arg-type]


# --- identities ----------------------------------------------------------------------------------


def test_a_node_is_either_owned_or_tagged() -> None:
    with pytest.raises(InvalidInput, match="either owned or tagged"):
        node("x", 9, owner="a@b.c", tags=("db",))


def test_two_identities_cannot_hold_one_address() -> None:
    with pytest.raises(InvalidInput, match="already held by node:db-1"):
        MESH.with_node(NodeIdentity(name="twin", ipv4="100.64.0.1", ipv6="fd00::99"))


def test_agent_on_an_unknown_node_is_refused() -> None:
    with pytest.raises(InvalidInput, match="unknown node"):
        MESH.with_agent(agent("x", "a@b.c", ["db:read"], "nowhere", 9, 2))


def test_retagging_a_node_moves_its_agents_with_it() -> None:
    policy = load_policy("acls:\n  - from: {tag: ci}\n    to: ['tag:db:1']\n", "p.yaml")
    retagged = MESH.with_node(node("agents-1", 1, tags=("ci",)))
    members = compile_node_filter(policy, retagged, "db-1").sets[set_name("{tag: ci}")]
    assert members.v4 == {"100.64.1.1", "100.64.1.2"}


def test_removing_a_node_removes_its_agents() -> None:
    smaller = MESH.without_node("agents-1")
    assert "r1" not in smaller.agents and "agent:r1" not in smaller.actors
    assert not smaller.bucket(("principal", "nikita@acme.com"))


# --- properties on generated meshes ---------------------------------------------------------------

PRINCIPALS = ["ann@x.io", "bob@x.io", "cy@x.io"]
TAGS = ["db", "web", "ci"]
NODES = [f"n{i}" for i in range(6)]
SCOPES = ["db:read", "db:*", "*:read", "web:write", "*:*"]
DESTS = ["svc-a", "svc-b", "svc-c", "tag:db", "tag:web:80", "tag:ci:8000-8100", "node:n1:22", "node:n2"]
PROBES = [("tcp", 22), ("tcp", 80), ("tcp", 5432), ("udp", 8050), ("tcp", 9999), ("icmp", None)]

SERVICES = {
    "svc-a": {"nodes": ["tag:db"], "ports": [5432]},
    "svc-b": {"nodes": ["tag:web", "node:n2"], "ports": [80, "8000-8100"], "protocol": ["tcp", "udp"]},
    "svc-c": {"nodes": ["tag:ci"], "protocol": "icmp"},
}
GROUPS = {"g1": ["ann@x.io", "bob@x.io"], "g2": ["cy@x.io"]}

_selector = st.fixed_dictionaries({}, optional={
    "principal": st.sampled_from(PRINCIPALS),
    "group": st.sampled_from(sorted(GROUPS)),
    "owner": st.sampled_from(PRINCIPALS),
    "tag": st.sampled_from(TAGS),
    "node": st.sampled_from(NODES),
    "agent": st.sampled_from(["bot", "helper"]),
    "scope": st.sampled_from(SCOPES),
    "via": st.sampled_from(["direct", "agent", "any"]),
    "authorized": st.sampled_from(["grant", "delegation"]),
})


def _repair(sel: dict[str, Any]) -> dict[str, Any]:
    """Drop fields that contradict or hide each other, as a person fixing the check's errors would."""
    sel = dict(sel)
    if "scope" in sel or "agent" in sel or "authorized" in sel:
        if sel.get("via") in ("direct", "any"):
            del sel["via"]
        if sel.get("scope") == "*:*" and (sel.get("via") == "agent" or "agent" in sel or "authorized" in sel):
            del sel["scope"]
    if "principal" in sel and "group" in sel:
        del sel["group"]
    if "owner" in sel and "tag" in sel:
        del sel["owner"]
    if sel.get("via") == "direct":
        if "tag" in sel:
            sel.pop("principal", None)
            sel.pop("group", None)
        if "owner" in sel:
            sel.pop("principal", None)
            sel.pop("group", None)
    return sel or {"via": "any"}


def _acl(sel: dict[str, Any], dests: list[str], protocol: list[str] | None) -> dict[str, Any]:
    by_target: dict[str, str] = {}
    for d in dests:  # one entry per tag/node target, so no port hides another
        by_target.setdefault(d if not d.startswith(("tag:", "node:")) else ":".join(d.split(":")[:2]), d)
    acl: dict[str, Any] = {"from": _repair(sel), "to": list(by_target.values())}
    targets = [d for d in acl["to"] if d.startswith(("tag:", "node:"))]
    if protocol and targets:
        if protocol == ["icmp"] and any(d.count(":") == 2 for d in targets):
            protocol = ["tcp", "icmp"]
        acl["protocol"] = protocol
    return acl


_acls = st.lists(
    st.builds(_acl, _selector, st.lists(st.sampled_from(DESTS), min_size=1, max_size=3, unique=True),
              st.none() | st.lists(st.sampled_from(list(PROTOCOLS)), min_size=1, max_size=2, unique=True)),
    max_size=6,
)


@st.composite
def _identities(draw: st.DrawFn) -> Identities:
    nodes = []
    for i, name in enumerate(NODES):
        kind = draw(st.sampled_from(["owned", "tagged", "bare"]))
        owner = draw(st.sampled_from(PRINCIPALS)) if kind == "owned" else None
        tags = draw(st.sets(st.sampled_from(TAGS), min_size=1)) if kind == "tagged" else set()
        nodes.append(node(name, i, owner=owner, tags=tuple(tags)))
    agents = []
    for k in range(draw(st.integers(0, 6))):
        on = draw(st.integers(0, len(NODES) - 1))
        agents.append(AgentIdentity(
            id=f"a{k}", name=draw(st.sampled_from(["bot", "helper"])), principal=draw(st.sampled_from(PRINCIPALS)),
            scopes=parse_scopes(draw(st.lists(st.sampled_from(SCOPES), min_size=1, max_size=2))), node=NODES[on],
            ipv4=f"100.64.{on}.{k + 2}", ipv6=f"fd00::{on:x}:{k + 2:x}",
            authorized=draw(st.sampled_from(["grant", "delegation"]))))
    return Identities.build(nodes, agents)


def _policy(acls: list[dict[str, Any]]) -> Policy:
    try:
        return validate_policy({"groups": GROUPS, "services": SERVICES, "acls": acls})
    except PolicyError:
        assume(False)
        raise


_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(_acls, _identities())
def test_compiled_filters_agree_with_decide_on_every_flow(acls: list[dict[str, Any]], ids: Identities) -> None:
    policy = _policy(acls)
    mesh = compile_mesh(policy, ids)
    for node_name, dest in ids.nodes.items():
        node_filter = mesh.filters[node_name]
        assert node_filter == compile_node_filter(policy, ids, node_name)
        for actor in ids.actors.values():
            for protocol, port in PROBES:
                expected = decide(policy, actor, dest, port, protocol).allowed  # type: ignore[arg-type]
                assert actor.ipv4 is not None and actor.ipv6 is not None
                assert node_filter.allows(actor.ipv4, protocol, port) is expected  # type: ignore[arg-type]
                assert node_filter.allows(actor.ipv6, protocol, port) is expected  # type: ignore[arg-type]


@_SETTINGS
@given(_acls, _identities(), st.data())
def test_identity_delta_equals_recompiling(acls: list[dict[str, Any]], ids: Identities, data: st.DataObject) -> None:
    policy = _policy(acls)
    assume(ids.agents)
    agent_id = data.draw(st.sampled_from(sorted(ids.agents)))
    actor = ids.actors[f"agent:{agent_id}"]
    without = ids.without_agent(agent_id)
    for node_name in ids.nodes:
        full = compile_node_filter(policy, ids, node_name)
        less = compile_node_filter(policy, without, node_name)
        assert apply_delta(less, identity_delta(less, actor, "add")) == full
        assert apply_delta(full, identity_delta(full, actor, "remove")) == less
    mesh_deltas = compile_mesh(policy, without).identity_delta(actor, "add")
    for node_name, delta in mesh_deltas.items():
        less = compile_node_filter(policy, without, node_name)
        assert apply_delta(less, delta) == compile_node_filter(policy, ids, node_name)
