"""A node's certificate: the first against a token (enrollment), each next one against the last (renewal).

Enrollment is one transaction: check and spend the token, allocate the
block, sign, insert the node and its audit rows, reserve the netmap
version. A refused token is audited in a transaction of its own and
counted by the failure limiter, so guessing is slowed down while successful
enrollments cost nothing extra. An unknown id and a wrong secret get the
same answer, so the reply tells a guesser nothing about which ids exist.
Renewal signs again the claims the node already holds (it cannot widen
them), and the certificate it replaces stops working at once, since
authentication accepts only a node's current serial.
"""

from __future__ import annotations

from datetime import datetime

from meshcore.errors import Conflict, InvalidToken
from meshcore.identity import Claims, Identity, build_leaf, cert_pem, load_csr
from meshcore.tokens import hash_matches, parse_token
from meshcore.wire.api import EnrollRequest, EnrollResponse, RenewRequest, RenewResponse

from .certificates import record_certificate, sign_timed
from .context import Context
from .netmap import peer_node
from .nodes import existing_node, node_info
from .rows import NodeRow, TokenRow

__all__ = ["enroll", "renew"]


def enroll(ctx: Context, req: EnrollRequest, source: str, now: datetime) -> EnrollResponse:
    ctx.limiter.check(source, now)
    try:
        token = parse_token(req.token)
    except InvalidToken as exc:
        _refuse(ctx, source, None, str(exc), now)
        raise
    public_key = load_csr(req.csr)
    s = ctx.settings
    with ctx.store.transaction() as tx:
        row = tx.token(token.id)
        if row is not None and not row.reusable:  # spent on two replicas at once, it enrolls one node
            tx.lock(f"token {token.id}")
            row = tx.token(token.id)
        reason = _token_problem(row, req.token, now)
        if reason is None:
            assert row is not None
            if tx.node(req.name) is not None:
                raise Conflict(
                    f"a node named {req.name!r} is already enrolled; remove it first "
                    f"(meshctl nodes remove {req.name}) or enroll with another --name"
                )
            index = tx.allocate_block(s.prefixes.capacity)
            block = s.prefixes.block(index)
            addresses = (str(block.node_v4), str(block.node_v6))
            sid = s.spiffe_id("node", req.name)
            claims = Claims(kind="node", node=req.name, owner=row.owner, tags=tuple(row.tags),
                            addresses=addresses, blocks=(str(block.v4), str(block.v6)))
            cert = sign_timed(ctx, public_key, sid, claims, now, s.node_cert_ttl)
            serial = record_certificate(tx, cert, sid, req.name, now)
            node = NodeRow(req.name, index, req.wireguard_public_key, row.owner, list(row.tags), serial,
                           cert.not_valid_after_utc, now, row.id)
            tx.insert_node(node)
            tx.use_token(row.id)
            actor = f"token:{row.id}"
            tx.audit(now, actor, "token.used", row.id, source, node=req.name)
            tx.audit(now, actor, "node.enrolled", str(sid), source, owner=row.owner, tags=row.tags,
                     addresses=list(addresses), wireguard_public_key=req.wireguard_public_key)
            tx.audit(now, actor, "certificate.issued", str(sid), source, serial=serial,
                     not_after=cert.not_valid_after_utc)
            ctx.hub.record_delta(tx, upsert=(peer_node(node, s.prefixes),))
    if reason is not None:
        _refuse(ctx, source, token.id, reason, now)
        raise InvalidToken(reason)
    ctx.metrics.identities_issued.labels("node").inc()
    return EnrollResponse(
        domain=s.domain,
        certificate=cert_pem(cert),
        ca=cert_pem(ctx.ca.cert),
        node=node_info(s, node),
        mesh_prefixes=[str(s.prefixes.v4), str(s.prefixes.v6)],
    )


def renew(ctx: Context, ident: Identity, req: RenewRequest, now: datetime) -> RenewResponse:
    """A fresh certificate for a node that still holds a valid one."""
    public_key = load_csr(req.csr)
    name = ident.spiffe_id.name
    with ctx.store.transaction() as tx:
        existing_node(tx, name)
        cert = build_leaf(ctx.ca, public_key, ident.spiffe_id, ident.claims, now, ctx.settings.node_cert_ttl)
        serial = record_certificate(tx, cert, ident.spiffe_id, name, now)
        tx.set_node_certificate(name, serial, cert.not_valid_after_utc)
        tx.audit(now, str(ident.spiffe_id), "certificate.renewed", str(ident.spiffe_id), serial=serial,
                 previous=ident.serial_hex, not_after=cert.not_valid_after_utc)
    return RenewResponse(certificate=cert_pem(cert))


def _refuse(ctx: Context, source: str, token_id: str | None, reason: str, now: datetime) -> None:
    ctx.limiter.record_failure(source, now)
    with ctx.store.transaction() as tx:
        tx.audit(now, "anonymous", "token.refused", token_id, source, reason=reason)


def _token_problem(row: TokenRow | None, line: str, now: datetime) -> str | None:
    """Why a presented token cannot enroll, or None when it can."""
    if row is None or not hash_matches(line, row.hash):
        return "enrollment token is not valid for this mesh"
    if now >= row.expires_at:
        return f"enrollment token expired at {row.expires_at.isoformat(timespec='seconds')}"
    if not row.reusable and row.uses > 0:
        return "enrollment token was already used (it is single-use; create another with meshctl token create)"
    return None
