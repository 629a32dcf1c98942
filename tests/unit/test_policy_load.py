"""Loading a policy: every error names file, line and column and says what is wrong."""

from __future__ import annotations

import re
import textwrap
from datetime import timedelta

import pytest

from meshcore.errors import InvalidInput, PolicyError
from meshcore.policy import load_policy, validate_policy
from meshcore.policy.fields import ALL_PORTS, PortRange
from meshcore.scopes import Scope


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(textwrap.dedent(text), "policy.yaml")
    return list(info.value.problems)


def only_problem(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


SERVICES = """\
services:
  db: {nodes: [tag:db], ports: [5432]}
"""


# --- a good file -------------------------------------------------------------------------------


def test_seed_example_of_spec_loads_with_every_section() -> None:
    policy = load_policy(textwrap.dedent("""\
        groups:
          sre: [nikita@acme.com, li@acme.com]
        delegations:
          - principal: nikita@acme.com
            nodes: [owner:nikita@acme.com, tag:agents]
            scopes: ["db:read", "db:write", "web:*"]
            max_ttl: 1h
        services:
          db: {nodes: [tag:db], ports: [5432]}
        acls:
          - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
            to: [db]
        routes:
          - from: {scope: "billing:*"}
            to: 10.20.0.0/16
            via: tag:billing-gw
        tests:
          - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
            to: db:5432
            expect: allow
        """))
    assert policy.groups["sre"] == ("nikita@acme.com", "li@acme.com")
    assert policy.delegations[0].max_ttl == timedelta(hours=1)
    assert policy.delegations[0].scopes[2] == Scope("web", "*")
    assert policy.services["db"].ports == (PortRange(5432, 5432),)
    assert policy.acls[0].source.scope == Scope("db", "read")
    assert [str(p) for p in policy.routes[0].to] == ["10.20.0.0/16"]
    assert policy.where("acls", 0) == "policy.yaml:11:5"


def test_empty_file_is_an_empty_policy_that_allows_nothing() -> None:
    policy = load_policy("", "policy.yaml")
    assert policy.acls == () and policy.groups == {}


def test_section_written_with_nothing_under_it_is_empty() -> None:
    policy = load_policy("groups:\nacls:\ntests:\n", "policy.yaml")
    assert policy.groups == {} and policy.acls == () and policy.tests == ()


def test_tag_destination_without_port_means_every_port() -> None:
    policy = load_policy("acls:\n  - from: {tag: ci}\n    to: [tag:db]\n", "p.yaml")
    assert policy.acls[0].to[0].ports is None
    assert str(ALL_PORTS) == "*"


def test_policy_error_is_invalid_input_with_exit_code_2() -> None:
    with pytest.raises(InvalidInput) as info:
        load_policy("acls: 3\n", "p.yaml")
    assert info.value.exit_code == 2


# --- errors: exact lines -----------------------------------------------------------------------


def test_unknown_service_names_file_line_column_and_path() -> None:
    text = SERVICES + """\
acls:
  - from: {tag: ci}
    to: [db]
  - from: {tag: web}
    to:
      - dbx
"""
    assert only_problem(text) == "policy.yaml:8:9: acls[1].to[0]: unknown service 'dbx' (known: db)"


def test_unknown_group_is_an_error() -> None:
    text = "groups: {sre: [li@acme.com]}\nacls:\n  - from: {group: ops}\n    to: [tag:db:22]\n"
    assert only_problem(text) == "policy.yaml:3:19: acls[0].from.group: unknown group 'ops' (known: sre)"


def test_unknown_top_level_section_lists_the_known_ones() -> None:
    assert only_problem("acl: []\n") == (
        "policy.yaml:1:1: acl: unknown key 'acl' (expected groups, services, acls, tests, delegations, routes, mcp)"
    )


def test_unknown_key_in_selector_points_at_the_key() -> None:
    found = only_problem("acls:\n  - from: {principal: a@b.c, scpoe: 'db:read'}\n    to: [tag:db]\n")
    assert found == ("policy.yaml:2:30: acls[0].from.scpoe: unknown key 'scpoe' "
                     "(expected principal, group, owner, tag, node, via, agent, scope, authorized)")


def test_missing_key_is_reported_at_its_mapping() -> None:
    assert only_problem("acls:\n  - from: {tag: ci}\n") == "policy.yaml:2:5: acls[0]: missing required key 'to'"


@pytest.mark.parametrize(
    ("port", "message"),
    [
        ("70000", "port 70000 is out of range 1-65535"),
        ("0", "port 0 is out of range 1-65535"),
        ("'90-80'", "invalid port range '90-80': the first port is above the last"),
        ("http", "invalid port 'http': use a number, a range like 8000-8100, or '*'"),
        ("yes", "invalid port True: use a number, a range like 8000-8100, or '*'"),
    ],
)
def test_bad_service_port_is_an_error(port: str, message: str) -> None:
    text = f"services:\n  db: {{nodes: [tag:db], ports: [{port}]}}\n"
    assert only_problem(text) == f"policy.yaml:2:33: services.db.ports[0]: {message}"


def test_bad_port_on_tag_destination_is_an_error() -> None:
    found = only_problem("acls:\n  - from: {tag: ci}\n    to: ['tag:db:99999']\n")
    assert found == "policy.yaml:3:10: acls[0].to[0]: port 99999 is out of range 1-65535"


def test_prefix_with_host_bits_is_an_error() -> None:
    text = "routes:\n  - from: {tag: ci}\n    to: 10.20.0.1/16\n    via: node:gw\n"
    assert only_problem(text) == (
        "policy.yaml:3:9: routes[0].to[0]: invalid prefix '10.20.0.1/16': 10.20.0.1/16 has host bits set"
    )


def test_route_via_must_name_a_tag_or_node() -> None:
    text = "routes:\n  - from: {tag: ci}\n    to: 0.0.0.0/0\n    via: gw\n"
    assert only_problem(text) == (
        "policy.yaml:4:10: routes[0].via[0]: invalid node reference 'gw': expected tag:NAME or node:NAME"
    )


def test_bad_scope_is_an_error() -> None:
    found = only_problem("acls:\n  - from: {scope: 'db'}\n    to: [tag:db]\n")
    assert found == ("policy.yaml:2:19: acls[0].from.scope: invalid scope 'db': "
                     "expected resource:action, each a lower-case name or '*'")


def test_bad_principal_is_an_error() -> None:
    found = only_problem("groups:\n  sre: [nikita]\n")
    assert found == "policy.yaml:2:9: groups.sre[0]: invalid principal 'nikita': expected an address like nikita@acme.com"


def test_tag_syntax_is_checked_and_a_prefix_gets_a_hint() -> None:
    assert only_problem("acls:\n  - from: {tag: 'tag:ci'}\n    to: [tag:db]\n") == (
        "policy.yaml:2:17: acls[0].from.tag: write the tag name without the 'tag:' prefix: 'ci'"
    )
    assert only_problem("acls:\n  - from: {tag: CI}\n    to: [tag:db]\n") == (
        "policy.yaml:2:17: acls[0].from.tag: invalid tag name 'CI': use lower-case letters, digits and '-' "
        "(a DNS label)"
    )


def test_explicit_null_in_selector_is_refused_rather_than_meaning_anyone() -> None:
    found = only_problem("acls:\n  - from: {principal: , tag: ci}\n    to: [tag:db]\n")
    # the column of an empty value differs between libyaml and pure-Python PyYAML
    assert re.fullmatch(r"policy.yaml:2:2[23]: acls\[0\].from.principal: a value is required here "
                        r"\(remove the key to leave it out\)", found)


def test_empty_selector_is_an_error() -> None:
    assert only_problem("acls:\n  - from: {}\n    to: [tag:db]\n") == (
        "policy.yaml:2:11: acls[0].from: an empty selector matches everyone: write {via: any} if that is meant"
    )


def test_unknown_protocol_is_an_error() -> None:
    found = only_problem("acls:\n  - from: {tag: ci}\n    to: [tag:db]\n    protocol: sctp\n")
    assert found == "policy.yaml:4:15: acls[0].protocol: unknown protocol 'sctp': expected tcp, udp or icmp"


def test_wrong_type_says_what_was_expected() -> None:
    assert only_problem("acls:\n  - from: {tag: ci}\n    to: tag:db\n") == (
        "policy.yaml:3:9: acls[0].to: expected a list, got 'tag:db'"
    )
    assert only_problem("acls: {}\n") == "policy.yaml:1:7: acls: expected a list, got {}"


def test_top_level_must_be_a_mapping() -> None:
    assert only_problem("- a\n") == (
        "policy.yaml:1:1: (top level): a policy is a mapping of sections "
        "(groups, services, acls, tests, delegations, routes, mcp)"
    )


# --- fields that can never matter --------------------------------------------------------------


def test_scope_with_via_direct_can_never_match() -> None:
    found = only_problem("acls:\n  - from: {principal: a@b.c, via: direct, scope: 'db:read'}\n    to: [tag:db]\n")
    assert found == (
        "policy.yaml:2:50: acls[0].from.scope: scope can never match with via: direct: only agents have "
        "scopes, and via: direct selects devices acting without an agent"
    )


def test_wildcard_scope_with_via_direct_can_never_match() -> None:
    found = only_problem("acls:\n  - from: {via: direct, scope: '*:*'}\n    to: [tag:db]\n")
    assert "acls[0].from.scope: scope can never match with via: direct" in found


def test_agent_name_with_via_direct_can_never_match() -> None:
    found = only_problem("acls:\n  - from: {agent: bot, via: direct}\n    to: [tag:db]\n")
    assert found.startswith("policy.yaml:2:19: acls[0].from.agent: agent can never match with via: direct")


def test_via_any_with_scope_never_matters() -> None:
    found = only_problem("acls:\n  - from: {via: any, scope: 'db:read'}\n    to: [tag:db]\n")
    assert found == ("policy.yaml:2:17: acls[0].from.via: via: any never matters: scope only matches agents "
                     "(write via: agent, or leave via out)")


def test_wildcard_scope_with_via_agent_never_matters() -> None:
    found = only_problem("acls:\n  - from: {via: agent, scope: '*:*'}\n    to: [tag:db]\n")
    assert found == ('policy.yaml:2:31: acls[0].from.scope: scope "*:*" never matters: every agent holds a '
                     "scope, so it adds nothing to via: agent")


def test_via_agent_next_to_scope_is_allowed_as_in_the_spec() -> None:
    load_policy("acls:\n  - from: {principal: a@b.c, via: agent, scope: 'db:read'}\n    to: [tag:db]\n", "p")


def test_principal_inside_the_named_group_hides_the_group() -> None:
    text = "groups: {sre: [li@acme.com]}\nacls:\n  - from: {group: sre, principal: li@acme.com}\n    to: [tag:db]\n"
    assert only_problem(text) == (
        "policy.yaml:3:19: acls[0].from.group: group 'sre' never matters: principal li@acme.com is a member of it"
    )


def test_principal_outside_the_named_group_can_never_match() -> None:
    text = "groups: {sre: [li@acme.com]}\nacls:\n  - from: {group: sre, principal: bo@acme.com}\n    to: [tag:db]\n"
    assert only_problem(text) == (
        "policy.yaml:3:35: acls[0].from.principal: can never match: principal bo@acme.com is not a member "
        "of group 'sre'"
    )


def test_owner_and_tag_together_can_never_match() -> None:
    found = only_problem("acls:\n  - from: {owner: a@b.c, tag: ci}\n    to: [tag:db]\n")
    assert found == ("policy.yaml:2:31: acls[0].from.tag: can never match: a node is either owned (owner) "
                     "or tagged (tag), never both")


def test_tagged_node_acting_directly_has_no_principal() -> None:
    found = only_problem("acls:\n  - from: {tag: ci, principal: a@b.c, via: direct}\n    to: [tag:db]\n")
    assert "acls[0].from.principal: can never match: a tagged node acting directly (via: direct) has no " \
           "principal" in found


def test_tag_with_principal_is_fine_for_agents_on_tagged_nodes() -> None:
    load_policy("acls:\n  - from: {tag: agents, principal: a@b.c}\n    to: [tag:db]\n", "p")


def test_protocol_on_an_acl_of_only_services_never_matters() -> None:
    text = SERVICES + "acls:\n  - from: {tag: ci}\n    to: [db]\n    protocol: udp\n"
    assert only_problem(text) == ("policy.yaml:6:15: acls[0].protocol: protocol never matters: every "
                                  "destination is a service, which brings its own protocol")


def test_port_on_an_icmp_destination_never_matters() -> None:
    found = only_problem("acls:\n  - from: {tag: ci}\n    to: ['tag:db:22']\n    protocol: icmp\n")
    assert found == "policy.yaml:3:10: acls[0].to[0]: the port of tag:db:22 never matters: ICMP has no ports"


def test_port_inside_another_listed_range_never_matters() -> None:
    text = "services:\n  web: {nodes: [tag:web], ports: ['8000-8100', 8080]}\n"
    assert only_problem(text) == (
        "policy.yaml:2:48: services.web.ports[1]: port 8080 never matters: port 8000-8100 already covers it"
    )


def test_specific_port_next_to_every_port_of_the_same_tag_never_matters() -> None:
    found = only_problem("acls:\n  - from: {tag: ci}\n    to: ['tag:db:22', tag:db]\n")
    assert found == "policy.yaml:3:10: acls[0].to[0]: tag:db:22 never matters: tag:db already covers it"


def test_service_with_a_port_in_an_acl_is_refused_with_a_hint() -> None:
    found = only_problem(SERVICES + "acls:\n  - from: {tag: ci}\n    to: ['db:5432']\n")
    assert found == ("policy.yaml:5:10: acls[0].to[0]: a service brings its own ports: write 'db', or name "
                     "the port on a tag or node (tag:NAME:5432)")


def test_tcp_service_without_ports_and_icmp_service_with_ports_are_errors() -> None:
    text = "services:\n  web: {nodes: [tag:web]}\n  ping: {nodes: [tag:web], protocol: icmp, ports: [1]}\n"
    assert problems(text) == [
        "policy.yaml:2:8: services.web: missing ports: a tcp service needs at least one port (or '*')",
        "policy.yaml:3:51: services.ping.ports: ports never matter: ICMP has no ports",
    ]


def test_delegation_scope_covered_by_another_never_matters() -> None:
    text = """\
delegations:
  - principal: a@b.c
    nodes: [tag:agents]
    scopes: ["web:*", "web:read"]
    max_ttl: 1h
"""
    assert only_problem(text) == (
        "policy.yaml:4:23: delegations[0].scopes[1]: scope web:read never matters: web:* already covers it"
    )


def test_delegation_duration_and_nodes_are_checked() -> None:
    text = "delegations:\n  - principal: a@b.c\n    nodes: [group:x]\n    scopes: ['db:read']\n    max_ttl: 1y\n"
    assert problems(text) == [
        ("policy.yaml:3:13: delegations[0].nodes[0]: invalid node reference 'group:x': expected owner:NAME "
         "or tag:NAME or node:NAME"),
        "policy.yaml:5:14: delegations[0].max_ttl: invalid duration '1y': use forms like 90s, 15m, 1h30m, 7d",
    ]


# --- requires_grant ------------------------------------------------------------------------------

DELEGATION = """\
delegations:
  - principal: a@b.c
    nodes: [tag:agents]
    scopes: ["db:read", "db:write", "web:*"]
    max_ttl: 1h
    requires_grant: {}
"""


@pytest.mark.parametrize(("value", "loaded"), [
    ("true", True),
    ("false", False),
    ('["db:write"]', (Scope("db", "write"),)),
    ('["db:*"]', (Scope("db", "*"),)),  # overlaps db:read and db:write: every db request needs a grant
    ('["*:*", ]', (Scope("*", "*"),)),
    ('["web:deploy", "db:write"]', (Scope("db", "write"), Scope("web", "deploy"))),
])
def test_requires_grant_is_true_false_or_a_list_of_scope_patterns(value: str, loaded: object) -> None:
    policy = load_policy(DELEGATION.format(value), "policy.yaml")
    got = policy.delegations[0].requires_grant
    assert (sorted(got) if isinstance(got, tuple) else got) == (sorted(loaded) if isinstance(loaded, tuple)
                                                                 else loaded)
    assert validate_policy(policy.to_data()) == policy


def test_requires_grant_defaults_to_the_nodes_word() -> None:
    policy = load_policy(DELEGATION.replace("    requires_grant: {}\n", ""), "policy.yaml")
    assert policy.delegations[0].requires_grant is False


@pytest.mark.parametrize(("value", "problem"), [
    ('["db:write", "DB"]', ("policy.yaml:6:34: delegations[0].requires_grant[1]: invalid scope 'DB': expected "
     "resource:action, each a lower-case name or '*'")),
    ('"db:write"', ('policy.yaml:6:21: delegations[0].requires_grant: expected true, false or a list of scopes: '
     'for one scope write ["db:write"]')),
    ("3", "policy.yaml:6:21: delegations[0].requires_grant: expected true, false or a list of scopes, got 3"),
    ("~", ("policy.yaml:6:21: delegations[0].requires_grant: a value is required here: true, false or a list of "
     "scopes (or remove the key)")),
    ("[]", ("policy.yaml:6:21: delegations[0].requires_grant: an empty list never requires a grant: write false, "
     "or leave requires_grant out")),
    ('["billing:*"]', ("policy.yaml:6:22: delegations[0].requires_grant[0]: pattern billing:* never matters: no "
     "scope this delegation grants (db:read, db:write, web:*) overlaps it, so no request it covers can need it")),
    ('["db:admin"]', ("policy.yaml:6:22: delegations[0].requires_grant[0]: pattern db:admin never matters: no "
     "scope this delegation grants (db:read, db:write, web:*) overlaps it, so no request it covers can need it")),
    ('["db:*", "db:write"]', ("policy.yaml:6:30: delegations[0].requires_grant[1]: pattern db:write never "
     "matters: db:* already covers it")),
    ('["db:write", "db:write"]', ("policy.yaml:6:34: delegations[0].requires_grant[1]: pattern db:write is "
     "listed twice")),
])
def test_requires_grant_patterns_are_checked_where_they_are_written(value: str, problem: str) -> None:
    assert only_problem(DELEGATION.format(value)) == problem


# --- authorized ----------------------------------------------------------------------------------


def test_authorized_selects_agents_and_implies_via_agent() -> None:
    policy = load_policy("acls:\n  - from: {principal: a@b.c, authorized: grant}\n    to: [tag:db]\n"
                         "  - from: {authorized: delegation, via: agent, scope: 'db:read'}\n    to: [tag:db]\n", "p")
    assert policy.acls[0].source.effective_via == "agent"
    assert policy.acls[0].source.text() == "{principal: a@b.c, via: agent, authorized: grant}"
    assert policy.acls[1].source.text() == '{via: agent, authorized: delegation, scope: "db:read"}'


def test_authorized_with_via_direct_can_never_match() -> None:
    found = only_problem("acls:\n  - from: {principal: a@b.c, via: direct, authorized: grant}\n    to: [tag:db]\n")
    assert found == (
        "policy.yaml:2:55: acls[0].from.authorized: authorized can never match with via: direct: only agents "
        "are authorized by a grant or a delegation, and via: direct selects devices acting without an agent"
    )


def test_via_any_with_authorized_never_matters() -> None:
    found = only_problem("acls:\n  - from: {via: any, authorized: grant}\n    to: [tag:db]\n")
    assert found == ("policy.yaml:2:17: acls[0].from.via: via: any never matters: authorized only matches agents "
                     "(write via: agent, or leave via out)")


def test_wildcard_scope_with_authorized_never_matters() -> None:
    found = only_problem("acls:\n  - from: {authorized: grant, scope: '*:*'}\n    to: [tag:db]\n")
    assert found == ('policy.yaml:2:38: acls[0].from.scope: scope "*:*" never matters: every agent holds a '
                     "scope, so it adds nothing to authorized: grant")


@pytest.mark.parametrize("value", ["yes", "granted", "~", "[grant]"])
def test_authorized_is_grant_or_delegation(value: str) -> None:
    found = only_problem(f"acls:\n  - from: {{authorized: {value}}}\n    to: [tag:db]\n")
    assert found.startswith("policy.yaml:2:24: acls[0].from.authorized: ")
    assert "expected grant or delegation" in found or "a value is required" in found


def test_a_route_selector_may_name_authorized_too() -> None:
    policy = load_policy("routes:\n  - from: {authorized: grant, principal: a@b.c}\n    to: 0.0.0.0/0\n"
                         "    via: node:exit\n", "p")
    assert policy.routes[0].source.authorized == "grant"


def test_test_agent_acting_directly_is_not_authorized_by_anyone() -> None:
    text = "tests:\n  - from: {principal: a@b.c, via: direct, authorized: grant}\n    to: tag:db:22\n" \
        "    expect: deny\n"
    assert only_problem(text) == ("policy.yaml:2:55: tests[0].from.authorized: acting directly (via: direct) an "
                                  "identity is not authorized by a grant or a delegation: only agents are")


def test_test_from_authorized_describes_an_agent() -> None:
    text = "tests:\n  - from: {principal: a@b.c, authorized: grant, scope: 'db:write'}\n    to: tag:db:22\n" \
        "    expect: deny\n"
    source = load_policy(text, "p").tests[0].source
    assert source.effective_via == "agent" and source.effective_authorized == "grant"
    assert source.text() == '{principal: a@b.c, via: agent, authorized: grant, scope: "db:write"}'


def test_duplicates_are_reported_at_the_second_occurrence() -> None:
    assert only_problem("groups:\n  sre: [a@b.c, a@b.c]\n") == (
        "policy.yaml:2:16: groups.sre[1]: a@b.c is listed twice in group 'sre'"
    )


# --- tests section -----------------------------------------------------------------------------


def test_test_to_an_unknown_service_is_an_error() -> None:
    text = SERVICES + "tests:\n  - from: {tag: ci}\n    to: dbx:5432\n    expect: deny\n"
    assert only_problem(text) == "policy.yaml:5:9: tests[0].to: unknown service 'dbx' (known: db)"


def test_test_must_name_exactly_one_port() -> None:
    text = SERVICES + "tests:\n  - from: {tag: ci}\n    to: db\n    expect: deny\n" + \
        "  - from: {tag: ci}\n    to: tag:db:1-10\n    expect: deny\n"
    assert problems(text) == [
        "policy.yaml:5:9: tests[0].to: a test is one flow: name its port, e.g. db:5432",
        "policy.yaml:8:9: tests[1].to: a test is one flow: name one port, not 1-10",
    ]


def test_test_from_an_unknown_group_is_an_error() -> None:
    text = "tests:\n  - from: {group: sre}\n    to: tag:db:22\n    expect: deny\n"
    assert only_problem(text) == "policy.yaml:2:19: tests[0].from.group: unknown group 'sre'"


def test_test_from_a_principal_and_a_group_is_refused() -> None:
    text = "groups: {sre: [a@b.c]}\ntests:\n  - from: {group: sre, principal: a@b.c}\n    to: tag:db:22\n" \
        "    expect: deny\n"
    assert only_problem(text) == ("policy.yaml:3:19: tests[0].from.group: a principal's groups follow from "
                                  "`groups`: give principal or group, not both")


def test_test_agent_needs_a_principal_and_a_scope() -> None:
    text = "tests:\n  - from: {agent: bot}\n    to: tag:db:22\n    expect: deny\n"
    assert problems(text) == [
        "policy.yaml:2:11: tests[0].from: an agent acts for a principal: add principal (or group)",
        "policy.yaml:2:11: tests[0].from: an agent holds at least one scope: add scope",
    ]


def test_test_expect_must_be_allow_or_deny() -> None:
    text = "tests:\n  - from: {tag: ci}\n    to: tag:db:22\n    expect: maybe\n"
    assert only_problem(text) == "policy.yaml:4:13: tests[0].expect: expected 'allow' or 'deny', got 'maybe'"


# --- YAML itself -------------------------------------------------------------------------------


def test_duplicate_key_is_an_error_instead_of_last_one_wins() -> None:
    found = only_problem("acls:\n  - from: {tag: ci}\n    to: [tag:db]\n    from: {tag: web}\n")
    assert found == "policy.yaml:4:5: acls[0]: duplicate key 'from'"


def test_non_string_key_is_an_error() -> None:
    found = only_problem("acls:\n  - from: {tag: ci, on: x}\n    to: [tag:db]\n")
    assert found == "policy.yaml:2:21: acls[0].from: key 'on' is not a string: quote it"


def test_merge_keys_are_refused() -> None:
    text = "services:\n  db: &base {nodes: [tag:db], ports: [1]}\n  db2:\n    <<: *base\n    ports: [2]\n"
    assert only_problem(text) == (
        "policy.yaml:4:5: services.db2: merge keys (<<) are not supported: write the entries out"
    )


def test_yaml_syntax_error_names_its_location() -> None:
    assert only_problem("acls:\n  - from: {tag: ci\n    to: [tag:db]\n").startswith("policy.yaml:3:7: ")


def test_two_documents_are_refused() -> None:
    assert "expected a single document" in only_problem("acls: []\n---\nacls: []\n")


def test_alias_bomb_is_refused_not_expanded() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
    found = only_problem("\n".join(lines) + "\n")
    assert "expands to more than 200000 nodes" in found


@pytest.mark.parametrize("depth", [65, 700, 5000])
def test_nesting_too_deep_is_one_located_line_not_a_recursion_error(depth: int) -> None:
    flow = "acls: " + "[" * depth + "]" * depth + "\n"
    block = "acls:\n" + "".join("  " * i + "-\n" for i in range(1, min(depth, 600)))
    for text in (flow, block):  # ours, or libyaml's own "exceeded maximum nesting depth" past 1,000
        found = only_problem(text)
        assert re.match(r"policy\.yaml:\d+:\d+: .*(nested more than 64 levels deep|maximum nesting depth)", found), found


def test_every_problem_of_a_file_is_reported_in_file_order() -> None:
    text = SERVICES + "acls:\n  - from: {group: nope}\n    to: [dbx]\n  - from: {tag: ci}\n    to: [dby]\n"
    assert [p.split(": ")[0] for p in problems(text)] == ["policy.yaml:4:19", "policy.yaml:5:10", "policy.yaml:7:10"]


def test_validate_policy_from_data_names_paths_without_lines() -> None:
    with pytest.raises(PolicyError) as info:
        validate_policy({"acls": [{"from": {"tag": "ci"}, "to": ["dbx"]}]}, "api")
    assert info.value.problems == ("api: acls[0].to[0]: unknown service 'dbx'",)
