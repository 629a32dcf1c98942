"""The wire protocol can evolve: answers ignore what they do not know, requests refuse it.

Every wire type of :mod:`meshcore.wire` has a sample here (a test fails when
a new type has none), so each one is checked as a newer peer would send it:
with an unknown field added to every JSON object in it.
"""

from __future__ import annotations

import inspect
import json
from datetime import UTC, datetime
from types import UnionType
from typing import Any, Union, get_args, get_origin

import pytest
from pydantic import BaseModel, ValidationError

from meshcore.wire import MIN_PROTOCOL, PROTOCOL, api, local, negotiate, stream
from meshcore.wire.base import Answer, Request

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
KEY = "A" * 43 + "="
REACH = {"reflexive": ["203.0.113.7:40001"], "relay": "203.0.113.1:49160", "nat": "independent",
         "probe_ufrag": "u1", "probe_pwd": "p" * 22}
NODE = {"name": "db-1", "wireguard_public_key": KEY, "addresses": ["100.64.0.1", "fd00:1::1"],
        "blocks": ["100.64.0.0/26", "fd00:1::/64"], "endpoints": ["198.51.100.10:51820"], "owner": None,
        "tags": ["db"], "routing": {"routes": ["10.20.0.0/16"], "route_key": KEY, "gateway_port": 51821},
        "reach": REACH}
NAT = {"stun": ["203.0.113.1:3478", "203.0.113.1:3479"],
       "relay": {"server": "203.0.113.1:3478", "username": "1800000000:db-1", "password": "x", "expires": 1800000000}}
NODE_INFO = {"name": "db-1", "spiffe_id": "spiffe://acme.mesh/node/db-1", "owner": None, "tags": ["db"],
             "addresses": ["100.64.0.1", "fd00:1::1"], "blocks": ["100.64.0.0/26", "fd00:1::/64"],
             "wireguard_public_key": KEY, "enrolled_at": NOW, "cert_not_after": NOW}
AGENT = {"id": "a0123456789abcdef", "name": "bot", "spiffe_id": "spiffe://acme.mesh/agent/a0123456789abcdef",
         "node": "agents-1", "principal": "nikita@acme.com", "scopes": ["db:read"], "parent": None,
         "addresses": ["100.64.0.66", "fd00:1:0:1::2"], "issued_at": NOW, "expires": NOW, "state": "live"}
FLOW = {"at": NOW, "verdict": "deny", "rule": "default deny", "source": "100.64.0.66", "source_node": "agents-1",
        "principal": "nikita@acme.com", "agent": "a0123456789abcdef", "scopes": ["db:read"],
        "destination": "100.64.0.1", "protocol": "tcp", "port": 5433, "kind": "request",
        "request": "POST /mcp tools/call drop_table", "local_user": None}
POLICY_DOC = {"version": 3, "hash": "ab" * 32, "filename": "policy.yaml", "text": "acls: []\n"}
NETMAP = {"version": 7, "domain": "acme.mesh", "prefixes": ["100.64.0.0/10", "fd00:1::/48"], "nodes": {"db-1": NODE}}
DELTA = {"base": 7, "version": 8, "upsert": [NODE], "remove": ["old-1"]}
AGENTS = {"full": False, "certificates": ["-----BEGIN CERTIFICATE-----\n"], "revoked": ["a1"]}

SAMPLES: dict[type[BaseModel], Any] = {
    api.ErrorBody: {"error": "no such node"},
    api.EnrollRequest: {"token": "idm1.x", "csr": "-----BEGIN CERTIFICATE REQUEST-----", "wireguard_public_key": KEY,
                        "name": "db-1"},
    api.NodeInfo: NODE_INFO,
    api.EnrollResponse: {"protocol": PROTOCOL, "domain": "acme.mesh", "certificate": "pem", "ca": "pem",
                         "node": NODE_INFO, "mesh_prefixes": ["100.64.0.0/10", "fd00:1::/48"]},
    api.RenewRequest: {"csr": "pem"},
    api.RenewResponse: {"certificate": "pem"},
    api.PolicyApply: {"text": "acls: []\n", "filename": "policy.yaml"},
    api.PolicyInfo: {"version": 3, "hash": "ab" * 32, "filename": "policy.yaml", "applied_by": "admin",
                     "applied_at": NOW, "text": "acls: []\n", "unchanged": False},
    api.RouteInfo: {"node": "exit-a", "tags": ["exit"], "prefix": "0.0.0.0/0", "exit": True,
                    "enabled_by": ["routes[0]"]},
    api.AgentIssueRequest: {"csr": "pem", "name": "bot", "principal": "nikita@acme.com", "scopes": ["db:read"],
                            "ttl_seconds": 900, "parent": None, "ipv4": "100.64.0.66", "ipv6": "fd00:1:0:1::2"},
    api.AgentInfo: AGENT,
    api.AgentIssued: {"agent": AGENT, "certificate": "pem"},
    api.AgentRevokeRequest: {"principal": "nikita@acme.com"},
    api.AgentsEnded: {"ended": ["a1", "a2"]},
    api.WorkloadSvid: {"certificate": "-----BEGIN CERTIFICATE-----", "expires": "2026-11-01T13:00:00Z"},
    api.JwtSvidRequest: {"audience": ["db", "web"]},
    api.JwtSvid: {"token": "eyJ.eyJ.sig", "expires": "2026-11-01T12:05:00Z"},
    api.AuditEntry: {"id": 1, "at": NOW, "actor": "admin", "action": "agent.revoked", "target": "a1",
                     "source": None, "detail": {"reason": "revoked"}},
    api.FlowRecord: {**FLOW, "node": "db-1"},
    api.FlowReport: FLOW,
    api.FlowBatch: {"flows": [FLOW]},
    api.TokenCreateRequest: {"tags": ["db"], "owner": None, "ttl_seconds": 3600, "reusable": False},
    api.TokenInfo: {"id": "t1", "tags": ["db"], "owner": None, "reusable": False, "expires": NOW, "created": NOW,
                    "uses": 0},
    api.TokenCreated: {"id": "t1", "tags": ["db"], "owner": None, "reusable": False, "expires": NOW,
                       "created": NOW, "uses": 0, "token": "idm1.x"},
    stream.RouteOffer: NODE["routing"],
    stream.RouteOfferReport: NODE["routing"],
    stream.PeerNode: NODE,
    stream.Netmap: NETMAP,
    stream.NetmapDelta: DELTA,
    stream.PolicyDoc: POLICY_DOC,
    stream.AgentUpdate: AGENTS,
    stream.StreamMessage: {"type": "delta", "delta": DELTA},
    stream.EndpointReport: {"listen_port": 51820, "endpoints": ["198.51.100.10:51820"], "routing": NODE["routing"],
                            "reach": REACH},
    stream.Reachability: REACH,
    stream.ReachabilityReport: REACH,
    stream.RelayCredentials: NAT["relay"],
    stream.NatConfig: NAT,
    stream.ProbeRequest: {"peer": "db-2"},
    stream.ProbeAsk: {"peer": "db-2"},
    local.AgentRunRequest: {"principal": "nikita@acme.com", "scopes": ["db:read"], "ttl_seconds": 900,
                            "name": "bot", "uid": None, "gid": None, "grant": "a.b.c"},
    local.LoginRequest: {"csr": "pem", "ttl_seconds": 3600},
    local.ServeRequest: {"port": 8080, "to": "http://127.0.0.1:9000", "name": "api"},
    api.LoginStart: {"csr": "pem", "ttl_seconds": 3600, "user": "nikita", "uid": 1000},
    api.LoginStarted: {"id": "l1", "mode": "oidc", "user_code": "WDJB-MJHT", "verification_uri": "https://idp/device",
                       "verification_uri_complete": "https://idp/device?user_code=WDJB-MJHT", "expires_in": 600,
                       "interval": 5},
    api.LoginPoll: {"status": "done", "interval": 5, "principal": "nikita@acme.com", "certificate": "pem",
                    "not_after": NOW},
    api.LoginApprove: {"code": "WDJB-MJHT", "principal": "nikita@acme.com"},
    api.PrincipalInfo: {"principal": "nikita@acme.com", "spiffe_id": "spiffe://acme.mesh/user/acme.com/nikita",
                        "device": "laptop", "serial": "ab", "issued_at": NOW, "not_after": NOW},
    api.GrantRegister: {"grant": "a.b.c"},
    api.GrantInfo: {"id": "g1", "principal": "nikita@acme.com", "node": "tag:agents", "scopes": ["db:write"],
                    "issued_at": NOW, "expires": NOW, "uses": 1, "used": 0, "signer": "ab", "state": "live"},
    api.GrantRevokeRequest: {"principal": "nikita@acme.com"},
    api.GrantsRevoked: {"grants": ["g1"], "agents": ["a1"]},
}


def _wire_types() -> list[type[BaseModel]]:
    found = []
    for module in (api, stream, local):
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseModel) and obj.__module__ == module.__name__:
                found.append(obj)
    return found


def _model_paths(tp: Any, value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The path of every JSON object in ``value`` that is a wire model (not a free-form mapping such as an
    audit entry's ``detail``), following the type ``tp`` it was dumped from."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        out = [path]
        for name, field in tp.model_fields.items():
            if value.get(name) is not None:
                out += _model_paths(field.annotation, value[name], (*path, name))
        return out
    origin, args = get_origin(tp), get_args(tp)
    if origin in (list, tuple):
        return [p for i, v in enumerate(value) for p in _model_paths(args[0], v, (*path, i))]
    if origin is dict:
        return [p for k, v in value.items() for p in _model_paths(args[1], v, (*path, k))]
    if origin in (Union, UnionType):
        return [p for a in args if a is not type(None) for p in _model_paths(a, value, path)]
    return []


def _add_at(value: Any, paths: list[tuple[Any, ...]]) -> Any:
    """``value`` with a field this code does not know added to the objects at ``paths``."""
    copy = json.loads(json.dumps(value))
    for path in paths:
        target = copy
        for part in path:
            target = target[part]
        target["x_added_later"] = {"n": 1}
    return copy


def test_every_wire_type_is_a_request_or_an_answer_and_has_a_sample() -> None:
    types = _wire_types()
    assert set(types) == set(SAMPLES), "a wire type without a sample here is a type whose evolution is untested"
    for cls in types:
        assert issubclass(cls, Request | Answer), cls
        assert cls.model_config.get("extra") == ("forbid" if issubclass(cls, Request) or cls.__name__.endswith("Report")
                                                 else "ignore"), cls


@pytest.mark.parametrize("cls", [c for c in SAMPLES if c.model_config.get("extra") == "ignore"],
                         ids=lambda c: c.__name__)
def test_an_answer_from_a_newer_peer_reads_as_if_the_new_fields_were_not_there(cls: type[BaseModel]) -> None:
    sent = cls.model_validate(SAMPLES[cls]).model_dump(mode="json")
    paths = _model_paths(cls, sent)
    newer = _add_at(sent, paths)
    assert cls.model_validate_json(json.dumps(newer)) == cls.model_validate(sent)


@pytest.mark.parametrize("cls", [c for c in SAMPLES if c.model_config.get("extra") == "forbid"],
                         ids=lambda c: c.__name__)
def test_a_request_with_a_field_the_server_does_not_know_is_refused_at_any_depth(cls: type[BaseModel]) -> None:
    sent = cls.model_validate(SAMPLES[cls]).model_dump(mode="json")
    cls.model_validate(sent)  # the sample itself is valid
    for path in _model_paths(cls, sent):
        with pytest.raises(ValidationError, match="x_added_later"):
            cls.model_validate(_add_at(sent, [path]))


def test_a_stream_message_of_an_unknown_type_still_parses_so_that_a_reader_can_skip_it() -> None:
    line = json.dumps({"type": "hello-from-the-future", "hello-from-the-future": {"anything": [1, 2]}})
    message = stream.StreamMessage.model_validate_json(line)
    assert message.type == "hello-from-the-future" and message.type not in stream.MESSAGE_TYPES
    assert (message.full, message.delta, message.policy, message.agents) == (None, None, None, None)


@pytest.mark.parametrize(("theirs", "agreed"), [
    (None, 2),  # a node from before the handshake: it reads protocol 2
    ("2", 2), (str(PROTOCOL), PROTOCOL), (str(PROTOCOL + 5), PROTOCOL), (" 3 ", min(3, PROTOCOL)),
    (str(MIN_PROTOCOL - 1), None), ("three", None), ("", None),
])
def test_the_version_both_speak_is_the_lower_one_and_too_old_is_refused(theirs: str | None,
                                                                         agreed: int | None) -> None:
    assert negotiate(theirs) == agreed


def test_the_local_api_answers_cost_no_pydantic_to_read() -> None:
    """meshctl reads them as plain JSON; their types are TypedDicts mypy checks on meshd's side."""
    for name in ("Status", "Whois", "AgentRunAnswer", "PeerStatus"):
        assert not issubclass(getattr(local, name), BaseModel)


@pytest.mark.parametrize("principal", ["a\u0000b@c", "\u200b@\u200b", "nikita@acme.com\u202e", "ni\u00adkita@acme.com",
                                       "a b@c", "a@b@c", "nikita\u2066@acme.com", "\ufeffnikita@acme.com"])
def test_a_principal_with_invisible_control_or_space_characters_is_refused_everywhere(principal: str) -> None:
    from pydantic import ValidationError

    from meshcore.policy.fields import check_principal
    from meshcore.wire.api import AgentRevokeRequest

    with pytest.raises(ValueError, match="invalid principal"):
        check_principal(principal)  # policy files: delegations, owners, acls
    with pytest.raises(ValidationError):
        AgentRevokeRequest.model_validate({"principal": principal})  # the API


@pytest.mark.parametrize("principal", ["nikita@acme.com", "li.wei+ops@acme.co.jp", "josé@acme.es"])
def test_ordinary_principals_pass(principal: str) -> None:
    from meshcore.policy.fields import check_principal
    from meshcore.wire.api import AgentRevokeRequest

    assert check_principal(principal) == AgentRevokeRequest.model_validate({"principal": principal}).principal


@pytest.mark.parametrize(("model", "body"), [
    ("TokenCreateRequest", {"ttl_seconds": True}),  # once a 1-second token
    ("TokenCreateRequest", {"reusable": 0}),
    ("TokenCreateRequest", {"ttl_seconds": "3600"}),
    ("AgentRevokeRequest", {"principal": 7}),
])
def test_a_request_takes_numbers_as_numbers_and_booleans_as_booleans(model: str, body: dict[str, object]) -> None:
    from pydantic import ValidationError

    from meshcore.wire import api

    with pytest.raises(ValidationError):
        getattr(api, model).model_validate(body)
    assert api.TokenCreateRequest.model_validate({"ttl_seconds": 60, "reusable": True}).ttl_seconds == 60


def test_a_principal_has_one_spelling_wherever_it_enters() -> None:
    """``Nikita@ACME.com`` is ``nikita@acme.com`` (NFC, lower case) in the policy, the API and the local API, so a
    rule never misses an agent for a matter of case, and one person is never two principals."""
    import unicodedata

    from meshcore.policy.fields import check_principal
    from meshcore.wire.api import AgentRevokeRequest, TokenCreateRequest
    from meshcore.wire.local import AgentRunRequest

    decomposed = unicodedata.normalize("NFD", "José@ACME.es")  # "e" and a combining accent
    assert check_principal("Nikita@ACME.com") == "nikita@acme.com"
    assert AgentRevokeRequest.model_validate({"principal": "Nikita@ACME.com"}).principal == "nikita@acme.com"
    assert TokenCreateRequest.model_validate({"owner": "NIKITA@acme.com"}).owner == "nikita@acme.com"
    run = AgentRunRequest.model_validate({"principal": "Nikita@Acme.Com", "scopes": ["db:read"], "ttl_seconds": 60})
    assert run.principal == "nikita@acme.com"
    assert check_principal(decomposed) == "josé@acme.es" == AgentRevokeRequest.model_validate(
        {"principal": decomposed}).principal
