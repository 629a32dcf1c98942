"""Agent identities: issued to a node for its agents, ended with every descendant, listed.

The node makes the key and picks the addresses; the controller decides
whether the identity may exist at all. A root agent needs a delegation in
the policy in force; a sub-agent instead needs a live parent on the same
node, the parent's principal, scopes within the parent's and an end no
later than the parent's, so a parent can never hand out more than it holds.
A permission refusal is audited, in a transaction of its own since the
refused one left nothing behind. Ending an agent ends its whole subtree in
one transaction, and each birth and death goes at once to every node some
rule could admit the agent to (controller.netmap, meshcore.policy.audience).
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

from meshcore.addressing import NodeBlock
from meshcore.errors import Conflict, InvalidInput, InvalidToken, NotFound, PermissionDenied
from meshcore.grants import Grant, read_grant
from meshcore.identity import Claims, Identity, cert_pem, load_csr
from meshcore.policy import NodeIdentity, check_delegation
from meshcore.scopes import Scope, parse_scopes, scopes_within
from meshcore.wire.api import AgentInfo, AgentIssued, AgentIssueRequest, AgentsEnded
from meshcore.wire.stream import AgentUpdate

from .certificates import record_certificate, sign_timed
from .context import Context
from .netmap import AgentFacts
from .nodes import existing_node
from .policies import in_force
from .rows import AgentRow, NodeRow
from .store import Tx

__all__ = ["agent_update_for", "count_ended", "end_agent", "end_subtrees_locked", "issue_agent", "list_agents",
           "revoke_principal"]


def issue_agent(ctx: Context, caller: Identity, req: AgentIssueRequest, now: datetime) -> AgentIssued:
    """Sign an agent identity for the calling node, if a delegation (or its parent) allows it.

    The addresses must lie in the node's block, outside the node's own and
    those of its live agents. With a grant, the principal's own signed
    approval counts too (:func:`_use_grant`), and a delegation that
    ``requires_grant`` for these scopes is satisfied; a sub-agent carries
    its parent's grant (its authorization is its parent's).
    """
    node_name = caller.spiffe_id.name
    public_key = load_csr(req.csr)
    scopes = parse_scopes(req.scopes)
    ttl = timedelta(seconds=req.ttl_seconds)
    policy = in_force(ctx)
    try:
        grant = read_grant(req.grant, ctx.ca.cert, now) if req.grant is not None else None
    except InvalidToken as exc:
        _refused(ctx, caller, req, now, str(exc))
        raise PermissionDenied(str(exc)) from exc
    try:
        with ctx.store.transaction() as tx:
            tx.lock(f"node {node_name}")  # its births one at a time, on every replica: an address is given once
            row = existing_node(tx, node_name)
            block = ctx.settings.prefixes.block(row.block_index)
            ipv4, ipv6 = _agent_addresses(block, node_name, req.ipv4, req.ipv6)
            if tx.address_held(node_name, ipv4, ipv6, now):
                raise Conflict(f"agent address {ipv4}/{ipv6} is held by a live agent")
            if policy is None:
                raise PermissionDenied("no policy is applied, so no delegation lets anyone mint agents")
            node = NodeIdentity(name=row.name, owner=row.owner, tags=frozenset(row.tags),
                                ipv4=str(block.node_v4), ipv6=str(block.node_v6))
            grant_id = grant_signer = None
            if req.parent is None:
                if grant is not None:
                    _use_grant(tx, grant, row, req.principal, scopes, ttl, now)
                    grant_id, grant_signer = grant.id, grant.signer.serial_hex
                check_delegation(policy, req.principal, node, scopes, ttl, granted=grant is not None)
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
                grant_id, grant_signer = parent.grant_id, parent.grant_signer
            agent_id = "a" + secrets.token_hex(8)
            sid = ctx.settings.spiffe_id("agent", agent_id)
            claims = Claims(kind="agent", node=node_name, principal=req.principal, scopes=scopes,
                            parent=req.parent, addresses=(ipv4, ipv6), name=req.name, grant=grant_id,
                            grant_signer=grant_signer)
            cert = sign_timed(ctx, public_key, sid, claims, now, not_after - now)
            serial = record_certificate(tx, cert, sid, node_name, now)
            pem = cert_pem(cert)
            agent = AgentRow(agent_id, req.name, node_name, req.principal, [str(x) for x in scopes], req.parent,
                             ipv4, ipv6, serial, pem, now, cert.not_valid_after_utc, grant_id=grant_id,
                             grant_signer=grant_signer)
            tx.insert_agent(agent)
            ctx.hub.record_agents(tx, AgentUpdate(certificates=(pem,)), born=(AgentFacts.of(agent),))
            tx.audit(now, str(caller.spiffe_id), "agent.issued", str(sid), principal=req.principal,
                     scopes=agent.scopes, parent=req.parent, name=req.name, addresses=[ipv4, ipv6],
                     serial=serial, not_after=cert.not_valid_after_utc, grant=grant_id,
                     authorized_by=authorized_by(agent))
    except PermissionDenied as exc:
        _refused(ctx, caller, req, now, str(exc))
        raise
    ctx.metrics.identities_issued.labels("agent").inc()
    return AgentIssued(agent=_agent_info(ctx, agent, now), certificate=pem)


def _agent_addresses(block: NodeBlock, node: str, ipv4: str, ipv6: str) -> tuple[str, str]:
    """The agent's two addresses in their one canonical spelling, each an agent address of ``block``.

    Addresses are compared as addresses, never as strings: ``FDD9::90`` and
    ``fdd9:0:0::90`` are one address, and a live agent's must not be given
    twice. The block's network and broadcast addresses and the node's own
    are nobody's agent address.
    """
    try:
        v4, v6 = ipaddress.IPv4Address(ipv4), ipaddress.IPv6Address(ipv6)
    except ValueError as exc:
        raise InvalidInput(f"invalid agent address: {exc}") from exc
    reserved = (block.v4.network_address, block.v4.broadcast_address, block.node_v4, block.v6.network_address,
                block.node_v6)
    for address in (v4, v6):
        if address not in (block.v4 if address.version == 4 else block.v6) or address in reserved:
            raise PermissionDenied(f"agent address {address} is not in node {node}'s agent pool")
    return str(v4), str(v6)


def _refused(ctx: Context, caller: Identity, req: AgentIssueRequest, now: datetime, reason: str) -> None:
    """A refusal is audited in a transaction of its own: the refused one left nothing behind."""
    with ctx.store.transaction() as tx:
        tx.audit(now, str(caller.spiffe_id), "agent.refused", None, principal=req.principal, scopes=req.scopes,
                 parent=req.parent, grant=req.grant is not None, reason=reason)


def authorized_by(row: AgentRow) -> str:
    """Who authorized an agent, in the words whois and the audit log use."""
    if row.grant_id:
        return f"{row.principal} (grant {row.grant_id})"
    return f"node {row.node} (delegation)"


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


def agent_update_for(ctx: Context, agent_ids: list[str], now: datetime) -> AgentUpdate:
    """The certificates of ``agent_ids`` still live: what a node's stream starts from (the agents it needs,
    :meth:`meshcore.policy.audience.LiveAgents.of_node`)."""
    with ctx.store.transaction() as tx:
        return AgentUpdate(full=True, certificates=tuple(tx.live_certificates(agent_ids, now)))


def _end_subtrees(ctx: Context, actor: Identity, now: datetime, roots_of: Callable[[Tx], list[str]]) -> AgentsEnded:
    """End the agents ``roots_of`` picks and every live descendant, in one transaction."""
    revoked = actor.spiffe_id.kind == "admin"
    with ctx.store.transaction() as tx:
        ended = end_subtrees_locked(ctx, tx, str(actor.spiffe_id), roots_of(tx), now, revoked=revoked)
    count_ended(ctx, ended, revoked=revoked)
    return AgentsEnded(ended=ended)


def end_subtrees_locked(ctx: Context, tx: Tx, actor: str, roots: list[str], now: datetime, *, revoked: bool,
                        why: str | None = None) -> list[str]:
    """End ``roots`` and every live descendant inside ``tx`` (audited); :func:`count_ended` after the commit.

    ``revoked``: taken away (by the admin, or with the grant it was born
    from); else retired (its own node says it ended). ``why`` says more.
    """
    reason = "revoked" if revoked else "retired"
    ended: list[str] = []
    todo = list(roots)
    while todo:
        current = todo.pop()
        if current in ended:
            continue
        ended.append(current)
        todo += tx.agent_children(current)
    for ended_id in ended:
        text = why or reason if ended_id in roots else f"{reason} (parent {'revoked' if revoked else 'ended'})"
        tx.end_agent(ended_id, now, text)
        tx.audit(now, actor, f"agent.{reason}", str(ctx.settings.spiffe_id("agent", ended_id)), reason=text)
    if ended:  # every node that holds them, on every replica, stops honouring them when this commits
        ctx.hub.record_agents(tx, AgentUpdate(revoked=tuple(ended)))
    return ended


def count_ended(ctx: Context, ended: list[str], *, revoked: bool) -> None:
    """After the commit: the metric of identities ended."""
    if ended:
        ctx.metrics.identities_ended.labels("revoked" if revoked else "retired").inc(len(ended))


def _use_grant(tx: Tx, grant: Grant, node: NodeRow, principal: str, scopes: tuple[Scope, ...],
              ttl: timedelta, now: datetime) -> None:
    """Count one use of ``grant`` for an agent of ``node``, or PermissionDenied saying what does not fit.

    ``grant`` is what :func:`meshcore.grants.read_grant` checked (signature,
    signer certificate, expiry); this checks the controller's own record of
    it (:mod:`controller.grants`).
    """
    tx.lock(f"grant {grant.id}")  # its uses counted one replica at a time
    row = tx.grant(grant.id)
    if row is None:
        raise PermissionDenied(f"grant {grant.id} is not registered (meshctl grant create registers it)")
    if (row.principal, row.signer, row.node, row.scopes) != (grant.principal, grant.signer.serial_hex,
                                                             str(grant.node), [str(s) for s in grant.scopes]):
        raise PermissionDenied(f"grant {grant.id} does not match the grant registered under its id")
    state = row.state(now)
    if state != "live":
        raise PermissionDenied(f"grant {grant.id} is {state}" + (f" ({row.uses} of {row.uses_allowed} used)"
                                                                  if state == "used up" else ""))
    if tx.certificate_revoked(row.signer) is not False:
        raise PermissionDenied(f"grant {grant.id} was signed by a principal certificate that is revoked "
                               f"({grant.principal} logged out)")
    if not grant.node.matches(node.name, set(node.tags)):
        raise PermissionDenied(f"grant {grant.id} is for {grant.node}, not node {node.name}")
    if principal != grant.principal:
        raise PermissionDenied(f"grant {grant.id} speaks for {grant.principal}, not {principal}")
    if not scopes_within(scopes, grant.scopes):
        raise PermissionDenied(f"scopes {', '.join(str(s) for s in scopes)} exceed grant {grant.id}'s "
                               f"{', '.join(str(s) for s in grant.scopes)}")
    if now + ttl > row.not_after:
        raise PermissionDenied(f"the agent would outlive grant {grant.id}, which ends at "
                               f"{row.not_after.isoformat(timespec='seconds')}")
    tx.use_grant(grant.id)


def _agent_info(ctx: Context, row: AgentRow, now: datetime) -> AgentInfo:
    state = (row.end_reason or "ended").split(" ")[0] if row.ended_at else ("live" if row.live(now) else "expired")
    return AgentInfo(id=row.id, name=row.name, spiffe_id=str(ctx.settings.spiffe_id("agent", row.id)),
                     node=row.node, principal=row.principal, scopes=row.scopes, parent=row.parent,
                     addresses=[row.ipv4, row.ipv6], issued_at=row.issued_at, expires=row.not_after, state=state,
                     authorized_by=authorized_by(row), grant=row.grant_id)
