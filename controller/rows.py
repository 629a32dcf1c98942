"""The rows of the controller's store, as the concerns see them (typed, frozen)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["AgentRow", "AuditRow", "GrantRow", "LoginRow", "NodeRow", "PolicyRow", "TokenRow"]


@dataclass(frozen=True)
class TokenRow:
    id: str
    hash: bytes
    tags: list[str]
    owner: str | None
    reusable: bool
    created_at: datetime
    expires_at: datetime
    uses: int
    created_by: str


@dataclass(frozen=True)
class NodeRow:
    name: str
    block_index: int
    wg_public_key: str
    owner: str | None
    tags: list[str]
    cert_serial: str
    cert_not_after: datetime
    enrolled_at: datetime
    token_id: str | None
    endpoints: tuple[str, ...] = ()
    routing: dict[str, Any] = field(default_factory=dict)
    reach: dict[str, Any] = field(default_factory=dict)
    mcp_ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class PolicyRow:
    version: int
    hash: str
    filename: str
    text: str
    applied_by: str
    applied_at: datetime


@dataclass(frozen=True)
class AgentRow:
    id: str
    name: str
    node: str
    principal: str
    scopes: list[str]
    parent: str | None
    ipv4: str
    ipv6: str
    serial: str
    certificate: str
    issued_at: datetime
    not_after: datetime
    ended_at: datetime | None = None
    end_reason: str | None = None
    grant_id: str | None = None
    """The grant it was born from (a sub-agent: its root's); None: the node's word under a delegation."""
    grant_signer: str | None = None

    def live(self, now: datetime) -> bool:
        return self.ended_at is None and now < self.not_after


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    source: str | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class LoginRow:
    """A person's login in progress (or done), started by a node on their behalf."""

    id: str
    node: str
    local_user: str | None
    mode: str  # "oidc" or "approval"
    code_hash: bytes | None  # approval mode: SHA-256 of the user code
    device_code: str | None  # oidc mode: the identity provider's, never shown to anyone
    csr: str
    ttl_seconds: int
    interval: int
    created_at: datetime
    expires_at: datetime
    next_poll_at: datetime
    state: str  # pending, approved, done, denied
    principal: str | None = None
    approved_by: str | None = None
    serial: str | None = None
    certificate: str | None = None


@dataclass(frozen=True)
class GrantRow:
    id: str
    principal: str
    signer: str  # serial of the principal certificate that signed it
    node: str  # NODE or tag:TAG
    scopes: list[str]
    issued_at: datetime
    not_after: datetime
    uses_allowed: int | None
    uses: int = 0
    revoked_at: datetime | None = None
    revoked_by: str | None = None

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if now >= self.not_after:
            return "expired"
        if self.uses_allowed is not None and self.uses >= self.uses_allowed:
            return "used up"
        return "live"
