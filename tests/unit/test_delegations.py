"""Who may mint agents for whom: the delegation check, and when it needs the principal's grant."""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest

from meshcore.errors import PermissionDenied
from meshcore.policy import (
    Delegation,
    NodeIdentity,
    Policy,
    check_delegation,
    grant_needed_for,
    load_policy,
    run_tests,
    validate_policy,
    within_grant,
)
from meshcore.scopes import parse_scopes

POLICY = load_policy("""\
delegations:
  - principal: nikita@acme.com
    nodes: [owner:nikita@acme.com, tag:agents]
    scopes: ["db:read", "db:write", "web:*"]
    max_ttl: 1h
  - principal: nikita@acme.com
    nodes: [node:batch-1]
    scopes: ["db:read"]
    max_ttl: 8h
""", "p.yaml")

AGENTS = NodeIdentity(name="agents-1", tags=frozenset({"agents"}), ipv4="100.64.0.1", ipv6="fd00::1")
LAPTOP = NodeIdentity(name="laptop", owner="nikita@acme.com", ipv4="100.64.0.65", ipv6="fd00:0:0:1::1")
BATCH = NodeIdentity(name="batch-1", tags=frozenset({"batch"}), ipv4="100.64.0.129", ipv6="fd00:0:0:2::1")
CI = NodeIdentity(name="ci-1", tags=frozenset({"ci"}), ipv4="100.64.0.193", ipv6="fd00:0:0:3::1")


@pytest.mark.parametrize("node", [AGENTS, LAPTOP])
def test_a_node_named_by_tag_or_owner_may_mint_within_the_scopes(node: NodeIdentity) -> None:
    d = check_delegation(POLICY, "nikita@acme.com", node, parse_scopes(["db:read", "web:deploy"]),
                         timedelta(minutes=30))
    assert d.max_ttl == timedelta(hours=1)


def test_any_one_delegation_may_grant_the_request() -> None:
    d = check_delegation(POLICY, "nikita@acme.com", BATCH, parse_scopes(["db:read"]), timedelta(hours=4))
    assert d.max_ttl == timedelta(hours=8)


@pytest.mark.parametrize("principal, node, scopes, ttl, message", [
    ("li@acme.com", AGENTS, ["db:read"], 60, "no delegation lets any node mint agents for li@acme.com"),
    ("nikita@acme.com", CI, ["db:read"], 60, "no delegation lets node ci-1 mint agents for nikita@acme.com"),
    ("nikita@acme.com", AGENTS, ["db:*"], 60, "no delegation grants nikita@acme.com the scope(s) db:*"),
    ("nikita@acme.com", BATCH, ["web:read"], 60, "the scope(s) web:read on node batch-1"),
    ("nikita@acme.com", AGENTS, ["db:read"], 7200, "lifetime 2h exceeds the delegation's max_ttl 1h"),
])
def test_refusals_name_the_missing_grant(principal: str, node: NodeIdentity, scopes: list[str], ttl: int,
                                         message: str) -> None:
    with pytest.raises(PermissionDenied) as err:
        check_delegation(POLICY, principal, node, parse_scopes(scopes), timedelta(seconds=ttl))
    assert message in str(err.value)


def test_a_policy_without_delegations_grants_nothing() -> None:
    with pytest.raises(PermissionDenied):
        check_delegation(load_policy("", "p.yaml"), "nikita@acme.com", AGENTS, parse_scopes(["db:read"]),
                         timedelta(minutes=1))


# --- requires_grant: when the node's word is not enough ------------------------------------------

GRANTED = load_policy("""\
delegations:
  - principal: nikita@acme.com
    nodes: [tag:agents]
    scopes: ["db:*", "web:*"]
    max_ttl: 1h
    requires_grant: ["db:write"]
  - principal: li@acme.com
    nodes: [tag:agents]
    scopes: ["ops:*"]
    max_ttl: 1h
    requires_grant: true
  - principal: bob@acme.com
    nodes: [tag:agents]
    scopes: ["ci:*"]
    max_ttl: 1h
    requires_grant: false
""", "policy.yaml")


def ask(principal: str, *scopes: str, ttl: int = 600, granted: bool = False, policy: Policy = GRANTED) -> Delegation:
    return check_delegation(policy, principal, AGENTS, parse_scopes(scopes), timedelta(seconds=ttl), granted=granted)


def refusal(principal: str, *scopes: str, ttl: int = 600, policy: Policy = GRANTED) -> str:
    with pytest.raises(PermissionDenied) as err:
        ask(principal, *scopes, ttl=ttl, policy=policy)
    return str(err.value)


@pytest.mark.parametrize("scopes", [("db:read",), ("db:admin",), ("web:*",), ("web:deploy", "db:read")])
def test_scopes_that_overlap_no_listed_pattern_need_no_grant(scopes: tuple[str, ...]) -> None:
    assert ask("nikita@acme.com", *scopes) is GRANTED.delegations[0]


@pytest.mark.parametrize("scopes", [("db:write",), ("db:*",), ("db:read", "db:write")])
def test_a_scope_that_overlaps_a_listed_pattern_needs_a_grant(scopes: tuple[str, ...]) -> None:
    assert "needs a grant from nikita@acme.com" in refusal("nikita@acme.com", *scopes)
    assert ask("nikita@acme.com", *scopes, granted=True) is GRANTED.delegations[0]


def test_the_refusal_names_the_principal_the_scopes_the_rule_and_the_command() -> None:
    assert refusal("nikita@acme.com", "db:write") == (
        "scope db:write needs a grant from nikita@acme.com (delegations[0] at policy.yaml:2:5 requires_grant); "
        "ask them for one: meshctl grant create --node agents-1 --scope db:write")


def test_the_command_asks_for_every_requested_scope_and_the_message_names_those_that_need_it() -> None:
    assert refusal("nikita@acme.com", "db:read", "db:*") == (
        "scope db:* needs a grant from nikita@acme.com (delegations[0] at policy.yaml:2:5 requires_grant); "
        "ask them for one: meshctl grant create --node agents-1 --scope db:* --scope db:read")
    assert refusal("li@acme.com", "ops:read", "ops:deploy").startswith(
        "scopes ops:deploy, ops:read need a grant from li@acme.com (delegations[1] at policy.yaml:7:5 ")


def test_requires_grant_true_needs_a_grant_for_everything_and_false_for_nothing() -> None:
    assert "needs a grant from li@acme.com" in refusal("li@acme.com", "ops:read")
    assert ask("li@acme.com", "ops:read", granted=True) is GRANTED.delegations[1]
    assert ask("bob@acme.com", "ci:push") is GRANTED.delegations[2]
    assert ask("bob@acme.com", "ci:push", granted=True) is GRANTED.delegations[2]


@pytest.mark.parametrize("principal, scopes, ttl, message", [
    ("nikita@acme.com", ["db:write", "billing:read"], 60,
     "no delegation grants nikita@acme.com the scope(s) billing:read, db:write on node agents-1"),
    ("nikita@acme.com", ["db:write"], 7200, "lifetime 2h exceeds the delegation's max_ttl 1h for nikita@acme.com"),
    ("li@acme.com", ["db:read"], 60, "no delegation grants li@acme.com the scope(s) db:read"),
])
def test_other_refusals_come_first_and_read_as_before(principal: str, scopes: list[str], ttl: int,
                                                      message: str) -> None:
    for granted in (False, True):
        with pytest.raises(PermissionDenied) as err:
            ask(principal, *scopes, ttl=ttl, granted=granted)
        assert message in str(err.value) and "grant from" not in str(err.value)


def test_a_delegation_that_needs_no_grant_covers_what_another_would_need_one_for() -> None:
    policy = load_policy("""\
delegations:
  - principal: nikita@acme.com
    nodes: [tag:agents]
    scopes: ["db:*"]
    max_ttl: 1h
    requires_grant: true
  - principal: nikita@acme.com
    nodes: [node:agents-1]
    scopes: ["db:write"]
    max_ttl: 10m
""", "policy.yaml")
    assert ask("nikita@acme.com", "db:write", ttl=300, policy=policy) is policy.delegations[1]
    assert ask("nikita@acme.com", "db:write", ttl=300, granted=True, policy=policy) is policy.delegations[0]
    # past the second's max_ttl only the first covers it, and it needs a grant: that is the reason given
    assert refusal("nikita@acme.com", "db:write", ttl=1800, policy=policy).startswith(
        "scope db:write needs a grant from nikita@acme.com (delegations[0] at policy.yaml:2:5 requires_grant)")


def test_requires_grant_true_holds_even_for_a_request_without_scopes() -> None:
    assert refusal("li@acme.com") == ("an agent needs a grant from li@acme.com (delegations[1] at policy.yaml:7:5 "
                                      "requires_grant); ask them for one: meshctl grant create --node agents-1")
    assert ask("bob@acme.com") is GRANTED.delegations[2]


def test_a_policy_not_loaded_from_text_names_the_delegation_without_a_location() -> None:
    policy = validate_policy({"delegations": [{"principal": "nikita@acme.com", "nodes": ["tag:agents"],
                                               "scopes": ["db:write"], "max_ttl": "1h", "requires_grant": True}]})
    assert "(delegations[0] requires_grant)" in refusal("nikita@acme.com", "db:write", policy=policy)


def test_grant_needed_for_lists_the_requested_scopes_a_delegation_wants_a_grant_for() -> None:
    d = GRANTED.delegations[0]
    assert grant_needed_for(d, parse_scopes(["db:read", "db:*", "web:read"])) == parse_scopes(["db:*"])
    assert grant_needed_for(GRANTED.delegations[1], parse_scopes(["ops:a"])) == parse_scopes(["ops:a"])
    assert grant_needed_for(GRANTED.delegations[2], parse_scopes(["ci:a"])) == ()


# --- within_grant: the request against the grant it carries --------------------------------------

MIN = timedelta(minutes=1)


@pytest.mark.parametrize("scopes, ttl, grant, left, problem", [
    (["db:write"], 10 * MIN, ["db:write"], 30 * MIN, None),
    (["db:write", "db:read"], 30 * MIN, ["db:*"], 30 * MIN, None),
    (["db:*"], 10 * MIN, ["db:write"], 30 * MIN, "scope(s) db:* lie outside the grant (it grants db:write)"),
    (["db:read", "web:x"], MIN, ["db:read"], 30 * MIN, "scope(s) web:x lie outside the grant (it grants db:read)"),
    (["db:write"], 45 * MIN, ["db:write"], 30 * MIN, "lifetime 45m outlasts the grant, which ends in 30m"),
    (["db:write"], MIN, ["db:write"], timedelta(0), "the grant has expired"),
])
def test_within_grant_says_what_lies_outside_the_grant(scopes: list[str], ttl: timedelta, grant: list[str],
                                                       left: timedelta, problem: str | None) -> None:
    assert within_grant(parse_scopes(scopes), ttl, parse_scopes(grant), left) == problem


def test_the_seed_example_lets_agents_read_on_the_nodes_word_and_write_with_a_grant() -> None:
    text = (Path(__file__).resolve().parents[2] / "examples" / "policy.yaml").read_text()
    seed = load_policy(text, "examples/policy.yaml")
    assert run_tests(seed) == []
    ask_seed = partial(check_delegation, seed, "nikita@acme.com", AGENTS, ttl=timedelta(minutes=15))
    assert ask_seed(parse_scopes(["db:read"])) is seed.delegations[0]
    assert ask_seed(parse_scopes(["db:write"]), granted=True) is seed.delegations[0]
    with pytest.raises(PermissionDenied, match=r"^scope db:write needs a grant from nikita@acme.com "
                       r"\(delegations\[0\] at examples/policy.yaml:11:5 requires_grant\); ask them for one: "
                       r"meshctl grant create --node agents-1 --scope db:write$"):
        ask_seed(parse_scopes(["db:write"]))
