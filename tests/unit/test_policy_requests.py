"""Request-level decisions (meshcore.policy.requests) and the MCP body reader (meshcore.mcp)."""

from __future__ import annotations

import json

import pytest

from meshcore.errors import InvalidInput, PolicyError
from meshcore.mcp import is_json, read_body
from meshcore.policy import Actor, AppRequest, NodeIdentity, decide_request, explain, load_policy, scopes_supported
from meshcore.policy.requests import path_matches
from meshcore.scopes import parse_scopes

POLICY = load_policy("""
services:
  db: {nodes: [tag:db], ports: [8080]}
acls:
  - from: {principal: nikita@acme.com, via: agent, scope: "db:read"}
    to: [db]
    mcp_tools: [query, "describe_*"]
  - from: {principal: nikita@acme.com, via: agent, scope: "db:write"}
    to: [db]
    mcp_tools: [drop_table]
  - from: {principal: nikita@acme.com, via: agent, scope: "web:read"}
    to: [db]
    http: [{methods: [GET], paths: ["/v1/*"]}]
  - from: {principal: li@acme.com}
    to: ["tag:db:9000"]
""", "policy.yaml")
DB = NodeIdentity(name="db-1", tags=frozenset({"db"}), ipv4="100.64.0.1", ipv6="fd00::1")


def agent(*scopes: str, principal: str = "nikita@acme.com") -> Actor:
    return Actor(key="agent:a1", via="agent", principal=principal, node="laptop", owner=None, tags=frozenset(),
                 agent="bot", scopes=parse_scopes(list(scopes)), authorized="delegation")


def mcp(*tools: str) -> AppRequest:
    return AppRequest("POST", "/mcp", tools)


def test_mcp_tools_narrow_tools_call_only_and_other_mcp_requests_pass() -> None:
    reader = agent("db:read")
    assert decide_request(POLICY, reader, DB, 8080, mcp("query")).allowed
    assert decide_request(POLICY, reader, DB, 8080, mcp("describe_users")).allowed  # a glob
    assert decide_request(POLICY, reader, DB, 8080, mcp()).allowed  # initialize, tools/list, ...
    refused = decide_request(POLICY, reader, DB, 8080, mcp("drop_table"))
    assert not refused.allowed and refused.refused_tool == "drop_table"
    assert refused.scopes == ("db:write",), "the challenge names the scope that would allow the call"


def test_a_batch_is_allowed_only_if_every_call_is_each_by_some_rule() -> None:
    both = agent("db:read", "db:write")
    assert decide_request(POLICY, both, DB, 8080, mcp("query", "drop_table")).allowed  # two rules, one each
    refused = decide_request(POLICY, agent("db:read"), DB, 8080, mcp("query", "drop_table"))
    assert not refused.allowed and refused.refused_tool == "drop_table"


def test_http_rules_match_method_and_path_glob_within_one_segment() -> None:
    web = agent("web:read")
    assert decide_request(POLICY, web, DB, 8080, AppRequest("GET", "/v1/items")).allowed
    assert not decide_request(POLICY, web, DB, 8080, AppRequest("GET", "/v1/items/7")).allowed
    assert not decide_request(POLICY, web, DB, 8080, AppRequest("POST", "/v1/items")).allowed
    refused = decide_request(POLICY, web, DB, 8080, AppRequest("DELETE", "/v1/items"))
    assert "no rule allows DELETE /v1/items" in refused.rule_text
    assert refused.scopes == ("db:read", "db:write"), "mcp_tools alone narrows tools/call, not other requests"


def test_a_request_on_a_connection_no_rule_allows_is_denied_as_the_connection_is() -> None:
    stranger = agent("db:read", principal="mallory@evil.com")
    decision = decide_request(POLICY, stranger, DB, 8080, mcp("query"))
    assert not decision.allowed and "default deny" in decision.rule_text
    unnarrowed = decide_request(POLICY, agent("x:y", principal="li@acme.com"), DB, 9000, AppRequest("PUT", "/a"))
    assert unnarrowed.allowed and unnarrowed.rule_index == 3


@pytest.mark.parametrize(("glob", "path", "matches"), [
    ("/v1/*", "/v1/a", True), ("/v1/*", "/v1/a/b", False), ("/v1/**", "/v1/a/b", True), ("/v1/**", "/v1", False),
    ("/a.b", "/aXb", False), ("/*/x", "/y/x", True), ("/", "/", True), ("/v1/*.json", "/v1/a.json", True),
])
def test_path_globs(glob: str, path: str, matches: bool) -> None:
    assert path_matches(glob, path) is matches


def test_scopes_supported_are_the_scopes_rules_name_for_the_port() -> None:
    assert scopes_supported(POLICY, DB, 8080) == ["db:read", "db:write", "web:read"]
    assert scopes_supported(POLICY, DB, 9000) == []


def test_explain_decides_one_request() -> None:
    decision = explain(POLICY, "principal=nikita@acme.com,via=agent,scope=db:read", "db:8080", tool="drop_table")
    assert decision.verdict == "deny" and "tools/call drop_table" in decision.flow
    with pytest.raises(InvalidInput, match="TCP"):
        explain(POLICY, "principal=nikita@acme.com", "tag:db:53", "udp", method="GET")
    with pytest.raises(InvalidInput, match="upper-case"):
        explain(POLICY, "principal=nikita@acme.com", "db:8080", method="get")


@pytest.mark.parametrize(("text", "message"), [
    ("acls:\n  - from: {principal: a@b.c}\n    to: ['tag:x:53']\n    protocol: udp\n    http: [{methods: [GET]}]\n",
     "http narrows HTTP requests, which travel over TCP, but this rule also allows udp"),
    ("acls:\n  - from: {principal: a@b.c}\n    to: ['tag:x:80']\n    mcp_tools: [q, q]\n", "q is listed twice"),
    ("acls:\n  - from: {principal: a@b.c}\n    to: ['tag:x:80']\n    http: [{paths: [v1]}]\n", "starting with '/'"),
    ("acls:\n  - from: {principal: a@b.c}\n    to: ['tag:x:80']\n    http: []\n", "must not be empty"),
    ("tests:\n  - from: {principal: a@b.c}\n    to: tag:x:80\n    tool: q\n    method: GET\n    expect: deny\n",
     "an MCP tools/call is a POST"),
])
def test_malformed_request_rules_are_refused_with_their_location(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as found:
        load_policy(text, "policy.yaml")
    assert str(found.value).startswith("policy.yaml:")


def test_a_body_speaks_mcp_when_it_is_json_rpc_with_an_mcp_method() -> None:
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "query", "arguments": {}}}
    body = read_body(json.dumps(call).encode())
    assert body is not None and body.tools == ("query",) and body.methods == ("tools/call",)
    batch = read_body(json.dumps([call, {**call, "params": {"name": "drop"}}]).encode())
    assert batch is not None and batch.tools == ("query", "drop")
    assert read_body(b'{"jsonrpc": "2.0", "method": "initialize", "id": 0}') is not None
    assert read_body(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}') is not None
    assert read_body(b'{"jsonrpc": "2.0", "method": "eth_call", "id": 1}') is None  # JSON-RPC, but not MCP
    assert read_body(b'{"query": "select 1"}') is None
    assert read_body(b'[1, 2]') is None


def test_a_body_declared_json_that_is_not_or_a_nameless_tools_call_is_refused() -> None:
    with pytest.raises(InvalidInput, match="not JSON"):
        read_body(b"{oops")
    with pytest.raises(InvalidInput, match="not JSON"):
        read_body(b"\xff\xfe")
    with pytest.raises(InvalidInput, match="without a tool name"):
        read_body(b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": 7}}')
    with pytest.raises(InvalidInput, match="not JSON"):
        read_body(b"[" * 100_000)


def test_json_content_types() -> None:
    assert is_json("application/json; charset=utf-8") and is_json("application/vnd.api+json")
    assert not is_json("text/plain") and not is_json(None)
