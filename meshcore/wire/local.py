"""meshd's local API (HTTP on its Unix socket): what ``meshctl`` sends and what meshd answers.

The answers are :class:`~typing.TypedDict` s, not pydantic models: they
cost nothing to import, so ``meshctl status``, ``whois`` and ``agent run``
read them as plain JSON (tolerant by nature: a key they do not know is
never looked at) while mypy checks that meshd builds them whole. The one
request, :class:`AgentRunRequest`, is validated strictly by meshd like every
request from outside (any process that may open the socket can send it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired, TypedDict

from pydantic import AfterValidator, Field, StringConstraints

from ..names import normal_principal
from .base import Request

__all__ = [
    "AgentRunAnswer",
    "AgentRunRequest",
    "ControllerContact",
    "ControllerLink",
    "LoginAnswer",
    "LoginRequest",
    "PeerStatus",
    "PolicyInForce",
    "SelfStatus",
    "ServeInfo",
    "ServeRequest",
    "Status",
    "Whois",
]


class AgentRunRequest(Request):
    """``POST /v1/agents``: make the calling process (identified by SO_PEERCRED, never by this body) an agent."""

    principal: Annotated[str, StringConstraints(max_length=320), AfterValidator(normal_principal)]
    scopes: list[str] = Field(min_length=1, max_length=64)
    ttl_seconds: int = Field(gt=0, le=366 * 86400, strict=True)
    name: str | None = Field(default=None, max_length=128)
    uid: int | None = Field(default=None, ge=0, strict=True, description="owner of the agent's key files (for --user)")
    gid: int | None = Field(default=None, ge=0, strict=True)
    grant: str | None = Field(default=None, max_length=16 * 1024,
                              description="the principal's grant (meshctl grant create); without one only root "
                              "and the uids meshd maps to the principal may ask")


class LoginRequest(Request):
    """``POST /v1/login``: start a login for the calling user (``meshctl login``); the key was made by meshctl."""

    csr: str = Field(max_length=8192)
    ttl_seconds: int = Field(default=12 * 3600, gt=0, le=7 * 86400, strict=True)


class ServeRequest(Request):
    """``POST /v1/serve``: terminate HTTP arriving over the mesh at ``port`` and forward it to ``to`` (root only)."""

    port: int = Field(ge=1, le=65535, strict=True)
    to: str = Field(max_length=2048)
    name: str | None = Field(default=None, max_length=63, description="the service's name: the assertion's "
                             "audience (default NODE-PORT)")
    mcp: bool = Field(default=False, strict=True, description="an MCP server: every node reports processes that "
                      "are not agents connecting to it (shadow MCP)")


class ServeInfo(TypedDict):
    """One served port (``meshctl serve list``): where its requests go, and the addresses it listens on."""

    port: int
    to: str
    name: str
    mcp: bool
    listening: list[str]
    error: str | None


class ControllerContact(TypedDict):
    """How a principal reaches the controller itself (grants, logout): its URL, trust domain and CA (PEM)."""

    url: str
    urls: NotRequired[list[str]]
    """Every controller replica's URL in the order to try (SPEC §8); absent from an older meshd: only ``url``."""
    domain: str
    ca: str


class LoginAnswer(TypedDict):
    """The login started: ``login`` is a :class:`meshcore.wire.api.LoginStarted` as JSON."""

    login: dict[str, Any]
    controller: ControllerContact
    device: str


class AgentRunAnswer(TypedDict):
    """The agent made: ``agent`` is its :class:`meshcore.wire.api.AgentInfo` as JSON; ``environment``
    the variables its command gets (IDMESH_AGENT_ID, IDMESH_AGENT_CERT, ...)."""

    agent: dict[str, Any]
    environment: dict[str, str]


class Whois(TypedDict):
    """``GET /v1/whois?address=A``: who holds an overlay address, as this node verified it."""

    kind: Literal["agent", "node"]
    node: str
    principal: str | None
    """The agent's principal, or the node's owner (None for a tagged node)."""
    agent: str | None
    name: NotRequired[str]
    """The agent's name (agents only)."""
    scopes: list[str]
    parent: str | None
    expires: str | None
    """ISO time the agent's certificate ends; None for a node."""
    tags: NotRequired[list[str]]
    """The node's tags (nodes only)."""
    addresses: list[str]
    authorized_by: NotRequired[str]
    """Who authorized an agent: ``nikita@acme.com (grant g...)`` or ``node agents-1 (delegation)``."""


class SelfStatus(TypedDict):
    name: str
    addresses: list[str]
    public_key: str
    tags: list[str]
    owner: str | None
    interface: str
    listen_port: int


class PolicyInForce(TypedDict):
    version: int
    """0: no policy yet (everything is denied)."""
    hash: str | None
    ruleset: str | None
    """Digest of the compiled ruleset installed in nftables."""
    rules: int


class ControllerLink(TypedDict):
    url: str
    """The controller streamed from, or (disconnected) the one tried next."""
    urls: NotRequired[list[str]]
    """Every controller replica's URL in the order tried (SPEC §8); absent from an older meshd: only ``url``."""
    connected: bool
    protocol: int | None
    """The wire protocol spoken on the stream (None: not connected yet)."""
    netmap_version: int | None
    applied_version: int | None
    last_error: str | None
    clock_offset_seconds: NotRequired[float | None]
    """The controller's clock minus this node's when the stream opened (its Date header; None: unknown)."""


class PeerStatus(TypedDict):
    name: str
    addresses: list[str]
    endpoint: str | None
    """Where WireGuard reaches it now (for a relayed peer: the local relay socket)."""
    path: str
    """``direct``, ``relay`` or ``none`` (no path found by probes: the controller's candidate is tried)."""
    last_probe: str
    nat: str
    """What the peer reported of its NAT: none, independent, varies (symmetric) or unknown."""
    latest_handshake: str | None
    rx_bytes: int
    tx_bytes: int
    tags: list[str]
    owner: str | None


class Status(TypedDict):
    """``GET /v1/status``: ``meshctl status``."""

    self: SelfStatus
    policy: PolicyInForce
    agents: dict[str, int]
    """``honored``: agent identities this node verified; ``local``: agents running here."""
    controller: ControllerLink
    peers: list[PeerStatus]
    routing: dict[str, Any] | None
    """Identity-based routes (:meth:`meshd.routes.routing.Routing.status`); None before they start."""
