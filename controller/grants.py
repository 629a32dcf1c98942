"""Grants at the controller: registered by the principal who signed them, used by nodes, revoked.

A principal signs a grant on their device (:mod:`meshcore.grants`) and
registers it here with their principal certificate, so that it can be
listed, its uses counted and revoked; only a registered grant starts an
agent. Using one happens inside the agent's issuing transaction
(:mod:`controller.agents`): the registered grant must be in force (not
revoked, not expired, uses left), its signer's certificate not revoked,
the requesting node the one it names, the principal its own, the scopes
within it and the lifetime within what is left of it. The policy's
delegations are checked too: a grant never widens what the policy
delegates.

**Revoking a grant revokes the live agents born from it**, with their
sub-agents, in the same transaction (as a Teleport lock ends the sessions
it covers): the person withdrew the authorization those agents act on.
Logging out revokes the principal certificate and every grant it signed,
so the same follows. Agents born on the node's word under a delegation are
not touched: nobody's grant authorized them.
"""

from __future__ import annotations

from datetime import datetime

from meshcore.errors import Conflict, NotFound, PermissionDenied
from meshcore.grants import read_grant
from meshcore.identity import Identity
from meshcore.wire.api import GrantInfo, GrantRegister, GrantsRevoked

from .agents import count_ended, end_subtrees_locked
from .context import Context
from .rows import GrantRow
from .store import Tx

__all__ = ["grant_info", "list_grants", "register_grant", "revoke_grant", "revoke_grants_locked",
           "revoke_principal_grants"]


def register_grant(ctx: Context, caller: Identity, req: GrantRegister, now: datetime) -> GrantInfo:
    """Record a grant the calling principal signed with the certificate it is calling with."""
    grant = read_grant(req.grant, ctx.ca.cert, now)
    if grant.signer.serial_hex != caller.serial_hex:
        raise PermissionDenied("a principal registers only grants signed with the certificate it calls with")
    row = GrantRow(grant.id, grant.principal, grant.signer.serial_hex, str(grant.node), [str(s) for s in grant.scopes],
                   grant.issued_at, grant.not_after, grant.uses)
    with ctx.store.transaction() as tx:
        tx.insert_grant(row)
        tx.audit(now, str(caller.spiffe_id), "grant.created", grant.id, principal=grant.principal, node=row.node,
                 scopes=row.scopes, uses=grant.uses, not_after=grant.not_after, signer=row.signer)
    return grant_info(row, now)


def list_grants(ctx: Context, caller: Identity, now: datetime, principal: str | None = None) -> list[GrantInfo]:
    """A principal's own grants; the admin's choice of principal (or all)."""
    if caller.spiffe_id.kind != "admin":
        principal = caller.spiffe_id.name
    with ctx.store.transaction() as tx:
        return [grant_info(g, now) for g in tx.grants(principal=principal)]


def revoke_grant(ctx: Context, caller: Identity, grant_id: str, now: datetime) -> GrantsRevoked:
    """Revoke one grant (its principal, or the admin), and the live agents born from it."""
    with ctx.store.transaction() as tx:
        row = tx.grant(grant_id)
        if row is None:
            raise NotFound(f"no grant {grant_id!r}")
        if caller.spiffe_id.kind != "admin" and row.principal != caller.spiffe_id.name:
            raise PermissionDenied(f"grant {grant_id} is {row.principal}'s")
        if row.revoked_at is not None:
            raise Conflict(f"grant {grant_id} was already revoked at {row.revoked_at.isoformat(timespec='seconds')}")
        ended = revoke_grants_locked(ctx, tx, str(caller.spiffe_id), [row], now)
    count_ended(ctx, ended, revoked=True)
    return GrantsRevoked(grants=[grant_id], agents=ended)


def revoke_principal_grants(ctx: Context, caller: Identity, principal: str, now: datetime) -> GrantsRevoked:
    """The admin revokes every grant of ``principal`` still in force, and the agents born from them."""
    with ctx.store.transaction() as tx:
        rows = [g for g in tx.grants(principal=principal) if g.revoked_at is None]
        ended = revoke_grants_locked(ctx, tx, str(caller.spiffe_id), rows, now)
    count_ended(ctx, ended, revoked=True)
    return GrantsRevoked(grants=[g.id for g in rows], agents=ended)


def revoke_grants_locked(ctx: Context, tx: Tx, actor: str, rows: list[GrantRow], now: datetime) -> list[str]:
    """Revoke ``rows`` inside ``tx`` and end the agents born from them; the agents ended, to announce."""
    ended: list[str] = []
    for row in rows:
        tx.revoke_grant(row.id, now, actor)
        tx.audit(now, actor, "grant.revoked", row.id, principal=row.principal, node=row.node)
        ended += end_subtrees_locked(ctx, tx, actor, tx.agents_of_grant(row.id), now, revoked=True,
                                     why=f"revoked (grant {row.id} revoked)")
    return ended


def grant_info(row: GrantRow, now: datetime) -> GrantInfo:
    return GrantInfo(id=row.id, principal=row.principal, node=row.node, scopes=row.scopes, issued_at=row.issued_at,
                     expires=row.not_after, uses=row.uses_allowed, used=row.uses, signer=row.signer,
                     state=row.state(now))
