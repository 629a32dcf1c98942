"""Single-flow decisions: union semantics, via, wildcard scopes, the policy's tests and explain."""

from __future__ import annotations

import textwrap

import pytest

from meshcore.errors import InvalidInput
from meshcore.policy import (
    Actor,
    Policy,
    Target,
    decide,
    explain,
    load_policy,
    run_tests,
    scopes_overlap,
)
from meshcore.scopes import Scope, parse_scope

SEED = """\
groups:
  sre: [nikita@acme.com, li@acme.com]
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
"""


def seed(tests: str = "") -> Policy:
    return load_policy(SEED + textwrap.dedent(tests), "policy.yaml")


def agent(principal: str, *scopes: str, tags: frozenset[str] = frozenset()) -> Actor:
    return Actor(key="agent:x", via="agent", principal=principal, node="n", owner=None, tags=tags,
                 agent="x", scopes=tuple(parse_scope(s) for s in scopes))


def device(owner: str | None, tags: frozenset[str] = frozenset()) -> Actor:
    return Actor(key="node:n", via="direct", principal=owner, node="n", owner=owner, tags=tags)


DB = Target(None, frozenset({"db"}))


# --- default deny and union --------------------------------------------------------------------


def test_empty_policy_denies_everything_by_default() -> None:
    decision = decide(load_policy("", "p.yaml"), device("nikita@acme.com"), DB, 5432)
    assert not decision.allowed
    assert decision.rule_index is None
    assert decision.rule_text == "no rule allows this: default deny"


def test_a_flow_is_allowed_when_any_rule_allows_it_and_the_first_is_named() -> None:
    decision = decide(seed(), device("nikita@acme.com"), DB, 5432)
    assert decision.allowed and decision.rule_index == 1


def test_union_lists_every_rule_that_allows_the_flow() -> None:
    policy = load_policy(SEED + '  - from: {owner: nikita@acme.com}\n    to: ["tag:db:5432"]\n', "p.yaml")
    decision = decide(policy, device("nikita@acme.com"), DB, 5432)
    assert (decision.rule_index, decision.also) == (1, (3,))


def test_rule_order_never_changes_a_verdict() -> None:
    forward = seed()
    data = forward.to_data()
    backward = Policy.model_validate({**data, "acls": list(reversed(data["acls"]))})
    actors = [device("nikita@acme.com"), device("li@acme.com"), device(None, frozenset({"ci"})),
              agent("nikita@acme.com", "db:read"), agent("li@acme.com", "db:read")]
    targets = [DB, Target(None, frozenset({"monitoring"})), Target("db-1", frozenset({"db"}))]
    for actor in actors:
        for target in targets:
            for port in (5432, 5433, 9100):
                assert decide(forward, actor, target, port).allowed == decide(backward, actor, target, port).allowed


def test_adding_a_rule_never_takes_away_what_another_allows() -> None:
    before = seed()
    after = load_policy(SEED + "  - from: {tag: ci}\n    to: [db]\n", "p.yaml")
    for actor in (device("nikita@acme.com"), agent("nikita@acme.com", "db:read"), device("li@acme.com")):
        for port in (5432, 5433):
            if decide(before, actor, DB, port).allowed:
                assert decide(after, actor, DB, port).allowed


# --- the seed example --------------------------------------------------------------------------


def test_nikitas_agent_with_db_read_reaches_db_but_not_db_admin() -> None:
    reader = agent("nikita@acme.com", "db:read")
    assert decide(seed(), reader, DB, 5432).allowed
    assert not decide(seed(), reader, DB, 5433).allowed


def test_nikitas_own_device_reaches_db_and_db_admin() -> None:
    assert decide(seed(), device("nikita@acme.com"), DB, 5432).allowed
    assert decide(seed(), device("nikita@acme.com"), DB, 5433).allowed


def test_node_tagged_ci_reaches_neither_service() -> None:
    ci = device(None, frozenset({"ci"}))
    assert not decide(seed(), ci, DB, 5432).allowed
    assert not decide(seed(), ci, DB, 5433).allowed


def test_group_member_reaches_monitoring_port_only() -> None:
    monitoring = Target(None, frozenset({"monitoring"}))
    assert decide(seed(), device("li@acme.com"), monitoring, 9100).allowed
    assert not decide(seed(), device("li@acme.com"), monitoring, 9101).allowed
    assert not decide(seed(), device("bob@acme.com"), monitoring, 9100).allowed


# --- via -----------------------------------------------------------------------------------------


def test_via_direct_excludes_agents_of_the_same_principal() -> None:
    assert not decide(seed(), agent("nikita@acme.com", "db:write"), DB, 5433).allowed


def test_via_agent_excludes_the_principals_own_device() -> None:
    policy = load_policy("acls:\n  - from: {principal: a@b.c, via: agent}\n    to: ['tag:db:1']\n", "p")
    assert decide(policy, agent("a@b.c", "x:y"), DB, 1).allowed
    assert not decide(policy, device("a@b.c"), DB, 1).allowed


def test_via_any_covers_devices_and_agents() -> None:
    policy = load_policy("acls:\n  - from: {principal: a@b.c}\n    to: ['tag:db:1']\n", "p")
    assert decide(policy, agent("a@b.c", "x:y"), DB, 1).allowed
    assert decide(policy, device("a@b.c"), DB, 1).allowed


def test_tag_selector_covers_agents_running_on_tagged_nodes() -> None:
    policy = load_policy("acls:\n  - from: {tag: ci}\n    to: ['tag:db:1']\n", "p")
    assert decide(policy, agent("a@b.c", "x:y", tags=frozenset({"ci"})), DB, 1).allowed
    assert not decide(policy, agent("a@b.c", "x:y"), DB, 1).allowed


# --- wildcard scopes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wanted", "held", "overlap"),
    [
        ("db:read", "db:read", True),
        ("db:read", "db:write", False),
        ("db:*", "db:read", True),
        ("db:read", "db:*", True),
        ("*:read", "db:read", True),
        ("*:read", "db:write", False),
        ("db:*", "*:read", True),
        ("billing:*", "*:*", True),
        ("web:read", "db:read", False),
    ],
)
def test_scope_selector_matches_when_some_action_lies_in_both(wanted: str, held: str, overlap: bool) -> None:
    assert scopes_overlap(parse_scope(wanted), parse_scope(held)) is overlap


def test_wildcard_scope_selector_reaches_every_action_of_its_resource() -> None:
    policy = load_policy("acls:\n  - from: {scope: 'db:*'}\n    to: ['tag:db:1']\n", "p")
    assert decide(policy, agent("a@b.c", "db:read"), DB, 1).allowed
    assert decide(policy, agent("a@b.c", "web:read", "db:write"), DB, 1).allowed
    assert not decide(policy, agent("a@b.c", "web:read"), DB, 1).allowed


def test_agent_holding_everything_matches_any_scope_selector() -> None:
    assert decide(seed(), agent("nikita@acme.com", "*:*"), DB, 5432).allowed


# --- the policy's tests ------------------------------------------------------------------------


def test_passing_tests_give_no_failures() -> None:
    policy = seed("""\
        tests:
          - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
            to: db:5432
            expect: allow
          - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
            to: db-admin:5433
            expect: deny
        """)
    assert run_tests(policy) == []


def test_failing_test_says_where_what_was_expected_and_which_rule_decided() -> None:
    policy = seed("""\
        tests:
          - from: {principal: nikita@acme.com, scope: "db:read"}
            to: db-admin:5433
            expect: allow
          - from: {principal: nikita@acme.com}
            to: db-admin:5433
            expect: deny
        """)
    first, second = (str(f) for f in run_tests(policy))
    assert first == (
        'policy.yaml:14:5: tests[0]: expected allow, got deny ({principal: nikita@acme.com, via: agent, '
        'scope: "db:read"} -> tag:db tcp/5433): no rule allows this: default deny; acls[0] at policy.yaml:7:5 '
        "matches the source but not this destination, protocol or port; acls[2] at policy.yaml:11:5 matches the "
        "source but not this destination, protocol or port; acls[1] at policy.yaml:9:5 covers this "
        "destination but not the source (from {principal: nikita@acme.com, via: direct})"
    )
    assert second == (
        "policy.yaml:17:5: tests[1]: expected deny, got allow ({principal: nikita@acme.com, via: direct} -> "
        "tag:db tcp/5433): allowed by acls[1] at policy.yaml:9:5: from {principal: nikita@acme.com, via: direct} "
        "to [db, db-admin]"
    )


def test_test_to_a_service_with_several_nodes_passes_only_if_every_node_allows() -> None:
    policy = load_policy(textwrap.dedent("""\
        services:
          db: {nodes: [tag:db, node:legacy-db], ports: [5432]}
        acls:
          - from: {tag: app}
            to: ["tag:db:5432"]
        tests:
          - from: {tag: app}
            to: db:5432
            expect: allow
        """), "policy.yaml")
    (failure,) = run_tests(policy)
    assert "node:legacy-db tcp/5432" in str(failure)


# --- explain -------------------------------------------------------------------------------------


def test_explain_names_the_rule_that_allowed_the_flow() -> None:
    decision = explain(seed(), "{principal: nikita@acme.com, via: agent, scope: 'db:read'}", "db:5432")
    assert str(decision) == (
        'allow: {principal: nikita@acme.com, via: agent, scope: "db:read"} -> tag:db tcp/5432: '
        'acls[0] at policy.yaml:7:5: from {principal: nikita@acme.com, via: agent, scope: "db:read"} to [db]'
    )


def test_explain_says_default_deny_when_nothing_allows() -> None:
    decision = explain(seed(), "principal=nikita@acme.com,via=agent,scope=db:read", "db-admin:5433")
    assert str(decision).endswith("-> tag:db tcp/5433: no rule allows this: default deny")
    assert decision.hints[0].startswith("acls[0] at policy.yaml:7:5 matches the source")


def test_explain_accepts_a_mapping_and_repeated_scopes() -> None:
    assert explain(seed(), {"tag": "monitoring"}, "tag:monitoring:9100").allowed is False
    decision = explain(seed(), "principal=nikita@acme.com,scope=web:read,scope=db:read", "db:5432")
    assert decision.allowed


@pytest.mark.parametrize(
    ("source", "to", "message"),
    [
        ("group=ops", "db:5432", "--from: group: unknown group 'ops' (known: sre)"),
        ("principal=nikita", "db:5432",
         "--from: principal: invalid principal 'nikita': expected an address like nikita@acme.com"),
        ("principal=a@b.c,via=agent", "db:5432", "--from: an agent holds at least one scope: add scope"),
        ("principal", "db:5432", "--from: expected key=value pairs, got 'principal'"),
        ("{tag: ci", "db:5432", "--from: not a YAML mapping: '{tag: ci'"),
        ("tag=ci", "db", "--to: a test is one flow: name its port, e.g. db:5432"),
        ("tag=ci", "dbx:1", "--to: unknown service 'dbx' (known: db, db-admin)"),
        ("tag=ci", "tag:db:x", "--to: invalid port 'x': use a number, a range like 8000-8100, or '*'"),
    ],
)
def test_explain_refuses_bad_input_with_one_line(source: str, to: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        explain(seed(), source, to)
    assert str(info.value) == message


def test_explain_from_a_group_matches_rules_naming_the_group_not_its_members() -> None:
    assert explain(seed(), "group=sre", "tag:monitoring:9100").allowed
    assert explain(seed(), "{group: sre, scope: 'x:y'}", "tag:monitoring:9100").allowed
    assert not explain(seed(), "group=sre", "db:5432").allowed  # nikita's rules name her, not sre


def test_explain_icmp_needs_no_port() -> None:
    policy = load_policy("acls:\n  - from: {tag: ci}\n    to: [tag:db]\n    protocol: icmp\n", "p")
    assert explain(policy, "tag=ci", "tag:db", "icmp").allowed
    assert not explain(policy, "tag=ci", "tag:db:22", "tcp").allowed


def test_scope_type_is_reused_from_meshcore_scopes() -> None:
    assert seed().acls[0].source.scope == Scope("db", "read")


# --- authorized: grant | delegation --------------------------------------------------------------

GRANTS = SEED + """\
  - from: {principal: nikita@acme.com, via: agent, authorized: grant, scope: "db:write"}
    to: [db-admin]
  - from: {principal: li@acme.com, authorized: delegation}
    to: [db]
"""


def granted(tests: str = "") -> Policy:
    return load_policy(GRANTS + textwrap.dedent(tests), "policy.yaml")


def test_an_agent_is_authorized_by_delegation_unless_it_says_grant() -> None:
    policy = granted()
    assert explain(policy, "principal=nikita@acme.com,scope=db:write,authorized=grant", "db-admin:5433").allowed
    assert not explain(policy, "principal=nikita@acme.com,scope=db:write,authorized=delegation", "db-admin:5433").allowed
    assert not explain(policy, "principal=nikita@acme.com,scope=db:write", "db-admin:5433").allowed
    assert explain(policy, "principal=li@acme.com,scope=x:y", "db:5432").allowed
    assert not explain(policy, {"principal": "li@acme.com", "scope": "x:y", "authorized": "grant"}, "db:5432").allowed


def test_a_selector_without_authorized_matches_agents_either_way() -> None:
    for how in ("grant", "delegation"):
        assert explain(granted(), f"principal=nikita@acme.com,scope=db:read,authorized={how}", "db:5432").allowed


def test_a_node_acting_directly_matches_no_authorized_selector() -> None:
    assert not decide(granted(), device("li@acme.com"), DB, 5432).allowed  # acls[4] is about li's agents only
    assert decide(granted(), device("nikita@acme.com"), DB, 5433).rule_index == 1  # directly, not by acls[3]


def test_a_denial_only_for_the_want_of_a_grant_says_so_first() -> None:
    decision = explain(granted(), "principal=nikita@acme.com,via=agent,scope=db:write", "db-admin:5433")
    assert not decision.allowed
    assert decision.hints[0] == (
        "acls[3] at policy.yaml:13:5 would allow this agent had it been started with its principal's grant, but "
        "it was started on its node's word, by a delegation (from {principal: nikita@acme.com, via: agent, "
        'authorized: grant, scope: "db:write"}); start it with a grant: meshctl agent run --grant')
    assert not any("acls[3]" in h for h in decision.hints[1:])


def test_the_hint_works_the_other_way_round_and_not_when_something_else_is_missing() -> None:
    other_way = explain(granted(), "principal=li@acme.com,scope=x:y,authorized=grant", "db:5432")
    assert other_way.hints[0].startswith("acls[4] at policy.yaml:15:5 would allow this agent had it been started "
                                         "on its node's word, by a delegation, but it was started with its "
                                         "principal's grant")
    wrong_scope = explain(granted(), "principal=nikita@acme.com,scope=db:read,authorized=delegation", "db-admin:5433")
    assert not any("would allow this agent" in h for h in wrong_scope.hints)
    assert any(h.startswith("acls[3] at policy.yaml:13:5 covers this destination but not the source") for h in
               wrong_scope.hints)


def test_policy_tests_describe_grant_authorized_agents() -> None:
    policy = granted("""\
        tests:
          - from: {principal: nikita@acme.com, authorized: grant, scope: "db:write"}
            to: db-admin:5433
            expect: allow
          - from: {principal: nikita@acme.com, scope: "db:write"}
            to: db-admin:5433
            expect: allow
        """)
    (failure,) = run_tests(policy)
    assert failure.index == 1 and "would allow this agent had it been started with its principal's grant" in str(
        failure)


def test_explain_refuses_authorized_on_a_device_and_unknown_values() -> None:
    with pytest.raises(InvalidInput, match="^--from: authorized: acting directly"):
        explain(granted(), "principal=nikita@acme.com,via=direct,authorized=grant", "db:5432")
    with pytest.raises(InvalidInput, match="^--from: authorized: expected grant or delegation, got 'yes'$"):
        explain(granted(), "principal=nikita@acme.com,scope=db:read,authorized=yes", "db:5432")


def test_a_rule_written_with_capitals_admits_the_principal_as_the_mesh_spells_it() -> None:
    from meshcore.policy import load_policy

    policy = load_policy("delegations:\n  - principal: Nikita@ACME.com\n    nodes: [tag:agents]\n"
                         "    scopes: ['db:read']\n    max_ttl: 1h\nacls: []\n")
    assert policy.delegations[0].principal == "nikita@acme.com"
