"""Who may mint agents for whom: the delegation check."""

from __future__ import annotations

from datetime import timedelta

import pytest

from meshcore.errors import PermissionDenied
from meshcore.policy import NodeIdentity, check_delegation, load_policy
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
