"""Agent identities: issued to a node for its agents, ended with every descendant, listed.

The node makes the key and picks the addresses; the controller decides
whether the identity may exist at all. A root agent needs a delegation in
the policy in force; a sub-agent instead needs a live parent on the same
node, the parent's principal, scopes within the parent's and an end no
later than the parent's, so a parent can never hand out more than it holds.
A permission refusal is audited, in a transaction of its own since the
refused one left nothing behind. Ending an agent ends its whole subtree in
one transaction, and each birth and death goes to every connected node at
once.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

from meshcore.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from meshcore.identity import Claims, Identity, cert_pem, load_csr
from meshcore.policy import NodeIdentity, check_delegation
from meshcore.scopes import parse_scopes, scopes_within
from meshcore.wire.api import AgentInfo, AgentIssued, AgentIssueRequest, AgentsEnded
from meshcore.wire.stream import AgentUpdate

from .certificates import record_certificate, sign_timed
from .context import Context
from .nodes import existing_node
from .policies import in_force
from .store import AgentRow, Tx

__all__ = ["agent_update_full", "end_agent", "issue_agent", "list_agents", "revoke_principal"]


def issue_agent(ctx: Context, caller: Identity, req: AgentIssueRequest, now: datetime) -> AgentIssued:
    """Sign an agent identity for the calling node, if a delegation (or its parent) allows it.

    The addresses must lie in the node's block, outside the node's own and
    those of its live agents.
    """
    node_name = caller.spiffe_id.name
    public_key = load_csr(req.csr)
    scopes = parse_scopes(req.scopes)
    ttl = timedelta(seconds=req.ttl_seconds)
    policy = in_force(ctx)
    try:
        with ctx.store.transaction() as tx:
            row = existing_node(tx, node_name)
            block = ctx.settings.prefixes.block(row.block_index)
            for address in (req.ipv4, req.ipv6):
                try:
                    inside = block.contains(address)
                except ValueError as exc:
                    raise InvalidInput(f"invalid agent address {address!r}") from exc
                if not inside or address in (str(block.node_v4), str(block.node_v6)):
                    raise PermissionDenied(f"agent address {address} is not in node {node_name}'s agent pool")
            taken = {a for other in tx.live_agents(now, node=node_name) for a in (other.ipv4, other.ipv6)}
            if req.ipv4 in taken or req.ipv6 in taken:
                raise Conflict(f"agent address {req.ipv4}/{req.ipv6} is held by a live agent")
            if policy is None:
                raise PermissionDenied("no policy is applied, so no delegation lets anyone mint agents")
            node = NodeIdentity(name=row.name, owner=row.owner, tags=frozenset(row.tags),
                                ipv4=str(block.node_v4), ipv6=str(block.node_v6))
            if req.parent is None:
                check_delegation(policy, req.principal, node, scopes, ttl)
                not_after = now + ttl
            else:
                parent = tx.agent(req.parent)
                if parent is None or not parent.live(now) or parent.node != node_name:
                    raise PermissionDenied(f"parent agent {req.parent} is not a live agent of node {node_name}")
                if parent.principal != req.principal:
                    raise PermissionDenied(f"a sub-agent acts for its parent's principal {parent.principal}")
                if not scopes_within(scopes, parse_scopes(parent.scopes)):
                    raise PermissionDenied(f"sub-agent scopes {', '.join(req.scopes)} exceed its parent's "
                                           f"{', '.join(parent.scopes)}")
                not_after = min(now + ttl, parent.not_after)
            agent_id = "a" + secrets.token_hex(8)
            sid = ctx.settings.spiffe_id("agent", agent_id)
            claims = Claims(kind="agent", node=node_name, principal=req.principal, scopes=scopes,
                            parent=req.parent, addresses=(req.ipv4, req.ipv6), name=req.name)
            cert = sign_timed(ctx, public_key, sid, claims, now, not_after - now)
            serial = record_certificate(tx, cert, sid, node_name, now)
            pem = cert_pem(cert)
            agent = AgentRow(agent_id, req.name, node_name, req.principal, [str(x) for x in scopes], req.parent,
                             req.ipv4, req.ipv6, serial, pem, now, cert.not_valid_after_utc)
            tx.insert_agent(agent)
            tx.audit(now, str(caller.spiffe_id), "agent.issued", str(sid), principal=req.principal,
                     scopes=agent.scopes, parent=req.parent, name=req.name, addresses=[req.ipv4, req.ipv6],
                     serial=serial, not_after=cert.not_valid_after_utc)
    except PermissionDenied as exc:
        with ctx.store.transaction() as tx:
            tx.audit(now, str(caller.spiffe_id), "agent.refused", None, principal=req.principal,
                     scopes=req.scopes, parent=req.parent, reason=str(exc))
        raise
    ctx.metrics.identities_issued.labels("agent").inc()
    ctx.hub.publish_agents(AgentUpdate(certificates=(pem,)))
    return AgentIssued(agent=_agent_info(ctx, agent, now), certificate=pem)


def end_agent(ctx: Context, actor: Identity, agent_id: str, now: datetime) -> AgentsEnded:
    """Revoke (the admin) or retire (its own node) one agent, with all its descendants."""

    def roots(tx: Tx) -> list[str]:
        row = tx.agent(agent_id)
        if row is None:
            raise NotFound(f"no agent {agent_id!r}")
        if actor.spiffe_id.kind != "admin" and row.node != actor.spiffe_id.name:
            raise PermissionDenied(f"agent {agent_id} belongs to node {row.node}")
        return [agent_id] if row.ended_at is None else []

    return _end_subtrees(ctx, actor, now, roots)


def revoke_principal(ctx: Context, actor: Identity, principal: str, now: datetime) -> AgentsEnded:
    """Revoke every live agent acting for ``principal``, with all their descendants."""
    return _end_subtrees(ctx, actor, now, lambda tx: [a.id for a in tx.live_agents(now, principal=principal)])


def list_agents(ctx: Context, caller: Identity, now: datetime) -> list[AgentInfo]:
    """The live agents: all of them for the admin, its own for a node."""
    node = None if caller.spiffe_id.kind == "admin" else caller.spiffe_id.name
    with ctx.store.transaction() as tx:
        return [_agent_info(ctx, a, now) for a in tx.live_agents(now, node=node)]


def agent_update_full(ctx: Context, now: datetime) -> AgentUpdate:
    """Every live agent certificate, for a node's stream to start from."""
    with ctx.store.transaction() as tx:
        return AgentUpdate(full=True, certificates=tuple(a.certificate for a in tx.live_agents(now)))


def _end_subtrees(ctx: Context, actor: Identity, now: datetime, roots_of: Callable[[Tx], list[str]]) -> AgentsEnded:
    """End the agents ``roots_of`` picks and every live descendant, in one transaction."""
    is_admin = actor.spiffe_id.kind == "admin"
    reason = "revoked" if is_admin else "retired"
    with ctx.store.transaction() as tx:
        roots = roots_of(tx)
        ended: list[str] = []
        todo = list(roots)
        while todo:
            current = todo.pop()
            if current in ended:
                continue
            ended.append(current)
            todo += tx.agent_children(current)
        for ended_id in ended:
            why = reason if ended_id in roots else f"{reason} (parent {'revoked' if is_admin else 'ended'})"
            tx.end_agent(ended_id, now, why)
            tx.audit(now, str(actor.spiffe_id), f"agent.{reason}", str(ctx.settings.spiffe_id("agent", ended_id)),
                     reason=why)
    if ended:
        ctx.metrics.identities_ended.labels(reason).inc(len(ended))
        ctx.hub.publish_agents(AgentUpdate(revoked=tuple(ended)))
    return AgentsEnded(ended=ended)


def _agent_info(ctx: Context, row: AgentRow, now: datetime) -> AgentInfo:
    state = (row.end_reason or "ended").split(" ")[0] if row.ended_at else ("live" if row.live(now) else "expired")
    return AgentInfo(id=row.id, name=row.name, spiffe_id=str(ctx.settings.spiffe_id("agent", row.id)),
                     node=row.node, principal=row.principal, scopes=row.scopes, parent=row.parent,
                     addresses=[row.ipv4, row.ipv6], issued_at=row.issued_at, expires=row.not_after, state=state)
