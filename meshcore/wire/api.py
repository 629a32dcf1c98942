"""The controller's HTTP API: request and answer bodies (the netmap stream is :mod:`.stream`).

The controller validates every request against these models (a malformed
body, or one with a field it does not know, is a 422 with a message);
clients parse every answer with them and ignore fields they do not know
(:mod:`.base`). Fields are documented where a missing value has a meaning.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StringConstraints

from ..names import PRINCIPAL_PATTERN, normal_principal
from . import PROTOCOL
from .base import REQUEST_CONFIG, Answer, Request

__all__ = [
    "AgentInfo",
    "AgentIssueRequest",
    "AgentIssued",
    "AgentRevokeRequest",
    "AgentsEnded",
    "AuditEntry",
    "EnrollRequest",
    "EnrollResponse",
    "ErrorBody",
    "FlowBatch",
    "FlowRecord",
    "FlowReport",
    "GrantInfo",
    "GrantRegister",
    "GrantRevokeRequest",
    "GrantsRevoked",
    "LoginApprove",
    "LoginPoll",
    "LoginStart",
    "LoginStarted",
    "NodeInfo",
    "PolicyApply",
    "PolicyInfo",
    "PrincipalInfo",
    "RenewRequest",
    "RenewResponse",
    "RouteInfo",
    "TokenCreateRequest",
    "TokenCreated",
    "TokenInfo",
]

_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_TAG = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_PRINCIPAL = PRINCIPAL_PATTERN
Principal = Annotated[str, StringConstraints(pattern=_PRINCIPAL, max_length=320), AfterValidator(normal_principal)]
"""A principal as a request gives it: checked, then in its one spelling (meshcore.names.normal_principal)."""
_WG_KEY = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"
Tag = Annotated[str, StringConstraints(pattern=_TAG)]


class ErrorBody(Answer):
    """Every error answer: one line for the user."""

    error: str


class EnrollRequest(Request):
    token: str = Field(max_length=2048, description="the whole enrollment token line")
    csr: str = Field(max_length=8192, description="PEM CSR over the node's Ed25519 identity key")
    wireguard_public_key: str = Field(pattern=_WG_KEY, description="base64 X25519 public key")
    name: str = Field(pattern=_NAME, description="node name, a DNS label")


class NodeInfo(Answer):
    name: str
    spiffe_id: str
    owner: str | None = Field(description="principal who owns the node; None for a tagged node")
    tags: list[str]
    addresses: list[str] = Field(description="the node's own overlay addresses, IPv4 then IPv6")
    blocks: list[str] = Field(description="the node's block prefixes, IPv4 then IPv6")
    wireguard_public_key: str
    enrolled_at: datetime
    cert_not_after: datetime


class EnrollResponse(Answer):
    protocol: int = Field(default=PROTOCOL, description="the controller's wire protocol (meshcore.wire)")
    domain: str
    certificate: str = Field(description="PEM node certificate (an X509-SVID)")
    ca: str = Field(description="PEM mesh CA certificate")
    node: NodeInfo
    mesh_prefixes: list[str] = Field(description="the whole overlay, IPv4 then IPv6")


class RenewRequest(Request):
    csr: str = Field(max_length=8192, description="PEM CSR over the node's (possibly new) Ed25519 key")


class RenewResponse(Answer):
    certificate: str = Field(description="PEM node certificate with a fresh validity window")


class PolicyApply(Request):
    text: str = Field(max_length=4 * 1024 * 1024, description="the policy YAML")
    filename: str = Field(default="policy.yaml", max_length=255, description="for error locations")


class PolicyInfo(Answer):
    version: int
    hash: str
    filename: str
    applied_by: str
    applied_at: datetime
    text: str | None = Field(default=None, description="left out of history listings")
    unchanged: bool = Field(default=False, description="the applied text was already the current policy")


class RouteInfo(Answer):
    """One route a node offers, and what the policy does with it (``meshctl routes list``)."""

    node: str
    tags: list[str]
    prefix: str
    exit: bool = Field(description="0.0.0.0/0 or ::/0: the node is an exit node")
    enabled_by: list[str] = Field(description="the policy routes rules that send someone through this offer; "
                                  "empty = offered but unused")


_SCOPE = r"^(\*|[a-z0-9][a-z0-9._-]{0,62}):(\*|[a-z0-9][a-z0-9._-]{0,62})$"
_AGENT_NAME = r"^[A-Za-z0-9._-]{1,128}$"


class AgentIssueRequest(Request):
    """A node asks for an agent certificate (the key was made on the node)."""

    csr: str = Field(max_length=8192)
    name: str = Field(pattern=_AGENT_NAME, description="what policy's agent: selector matches")
    principal: Principal
    scopes: list[Annotated[str, StringConstraints(pattern=_SCOPE)]] = Field(min_length=1, max_length=64)
    ttl_seconds: int = Field(gt=0, le=366 * 86400, strict=True)
    parent: str | None = Field(default=None, pattern=_AGENT_NAME, description="the agent this one is started from")
    ipv4: str = Field(max_length=64, description="chosen by the node from its block")
    ipv6: str = Field(max_length=64)
    grant: str | None = Field(default=None, max_length=16 * 1024,
                              description="the principal's signed grant (meshcore.grants); None: the node's word")


class AgentInfo(Answer):
    id: str
    name: str
    spiffe_id: str
    node: str
    principal: str
    scopes: list[str]
    parent: str | None
    addresses: list[str]
    issued_at: datetime
    expires: datetime
    state: str = Field(description="live, revoked, retired (its process ended) or expired")
    authorized_by: str = Field(default="", description="who authorized it: 'nikita@acme.com (grant g...)' "
                               "or 'node agents-1 (delegation)'")
    grant: str | None = Field(default=None, description="the grant it was born from; None: a delegation")


class AgentIssued(Answer):
    agent: AgentInfo
    certificate: str = Field(description="PEM X509-SVID of spiffe://<domain>/agent/<id>")


class AgentRevokeRequest(Request):
    principal: Principal = Field(description="revoke every live agent of this principal")


class WorkloadSvid(Answer):
    """A short X509-SVID for an agent's existing key, for the node's Workload API (controller.workload)."""

    certificate: str
    expires: datetime


class JwtSvidRequest(Request):
    audience: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] = Field(min_length=1,
                                                                                          max_length=16)


class JwtSvid(Answer):
    token: str
    expires: datetime


class AgentsEnded(Answer):
    ended: list[str] = Field(description="ids whose identities ended, descendants included")


class AuditEntry(Answer):
    """One identity event: who did what to whom, when, from where, with the details."""

    id: int
    at: datetime
    actor: str
    action: str = Field(description="e.g. node.enrolled, certificate.issued, agent.revoked, policy.applied")
    target: str | None
    source: str | None = Field(description="the client address, for events that came over the network")
    detail: dict[str, Any]


class FlowRecord(Answer):
    """One connection a node saw arrive over the mesh, with who sent it."""

    at: datetime
    verdict: str = Field(pattern=r"^(allow|deny)$")
    rule: str = Field(max_length=200, description="acls[N] that allowed it, or 'default deny'")
    source: str = Field(max_length=64)
    source_node: str | None = Field(default=None, max_length=128)
    principal: str | None = Field(default=None, max_length=320)
    agent: str | None = Field(default=None, max_length=128)
    scopes: list[str] = Field(default_factory=list, max_length=64)
    authorized_by: str | None = Field(default=None, max_length=400,
                                      description="for an agent: its grant's principal, or its node's delegation")
    destination: str = Field(max_length=64)
    protocol: str = Field(max_length=16)
    port: int | None = Field(default=None, ge=0, le=65535, strict=True)
    kind: Literal["connection", "request", "shadow-mcp"] = Field(
        default="connection", description="a connection (L3/L4), a request through meshctl serve, or a request "
        "speaking MCP from a source that is not an agent")
    request: str | None = Field(default=None, max_length=300, description="for a request: METHOD PATH and the MCP "
                                "tools it calls")
    local_user: str | None = Field(default=None, max_length=64, description="the sending node's local user, "
                                   "when the node that saw it knows")
    node: str | None = Field(default=None, description="the node that saw it (set by the controller)")


class FlowReport(FlowRecord):
    """A :class:`FlowRecord` as a node reports it: strict, like every request."""

    model_config = REQUEST_CONFIG


class FlowBatch(Request):
    flows: list[FlowReport] = Field(max_length=1000)


class TokenCreateRequest(Request):
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    owner: Principal | None = None
    ttl_seconds: int = Field(default=3600, gt=0, le=366 * 86400, strict=True)
    reusable: bool = Field(default=False, strict=True)


class TokenInfo(Answer):
    id: str
    tags: list[str]
    owner: str | None
    reusable: bool
    expires: datetime
    created: datetime
    uses: int


class TokenCreated(TokenInfo):
    token: str = Field(description="the token line; shown once, stored only hashed")


# -- principals: login, principal certificates, grants (SPEC §6) -------------------------------------------------

class LoginStart(Request):
    """A node starts a person's login on their behalf (``meshctl login``, through meshd)."""

    csr: str = Field(max_length=8192, description="PEM CSR over the person's Ed25519 key, made on the device")
    ttl_seconds: int = Field(default=12 * 3600, gt=0, le=7 * 86400, strict=True,
                             description="the principal certificate's lifetime asked for")
    user: str | None = Field(default=None, max_length=64, description="the local account on the device")
    uid: int | None = Field(default=None, ge=0, strict=True, description="its uid, as the node's kernel reported it")


class LoginStarted(Answer):
    """What the person must do (RFC 8628's device authorization answer, or an administrator's approval)."""

    id: str = Field(description="the login, for polling; secret to the device")
    mode: str = Field(description="'oidc': the organisation's identity provider; 'approval': an administrator "
                      "runs meshctl login approve CODE --principal P")
    user_code: str
    verification_uri: str | None = None
    verification_uri_complete: str | None = None
    expires_in: int = Field(description="seconds the code stays valid")
    interval: int = Field(description="seconds between polls")


class LoginPoll(Answer):
    """One poll of a login: still pending, or done with the principal certificate."""

    status: str = Field(description="'pending', 'slow_down' (poll less often: interval grew) or 'done'")
    interval: int
    principal: str | None = None
    certificate: str | None = Field(default=None, description="PEM principal certificate (user X509-SVID)")
    not_after: datetime | None = None


class LoginApprove(Request):
    """An administrator approves a pending login (the embedded mode, without an identity provider)."""

    code: str = Field(max_length=32)
    principal: Principal


class PrincipalInfo(Answer):
    """A principal certificate as the controller knows it (``meshctl whoami``)."""

    principal: str
    spiffe_id: str
    device: str | None = Field(description="the node the person logged in on")
    serial: str
    issued_at: datetime
    not_after: datetime


class GrantRegister(Request):
    """A principal registers a grant it signed, so that it can be listed, counted and revoked."""

    grant: str = Field(max_length=16 * 1024)


class GrantInfo(Answer):
    id: str
    principal: str
    node: str = Field(description="NODE or tag:TAG: where agents may be born from it")
    scopes: list[str]
    issued_at: datetime
    expires: datetime
    uses: int | None = Field(description="agents it may start; None: any number until it expires")
    used: int
    signer: str = Field(description="serial of the principal certificate that signed it")
    state: str = Field(description="live, used up, expired or revoked")


class GrantRevokeRequest(Request):
    principal: Principal = Field(description="revoke every grant of this principal")


class GrantsRevoked(Answer):
    grants: list[str] = Field(description="the grants revoked")
    agents: list[str] = Field(description="live agents born from them, revoked with them")
