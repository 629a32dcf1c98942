"""What a node's SPIFFE Workload API hands its agents, signed here: short X509-SVIDs, JWT-SVIDs, the JWT keys.

An agent's birth certificate lives as long as the agent (up to a year),
and that is safe inside the mesh: every node hears of a revocation within a
second. A service outside the mesh that checks an SVID against the bundle
hears nothing, so what leaves a node through the Workload API is short:
an X509-SVID lives at most ``serve --svid-ttl`` (an hour by default), is
signed again for the same key before it ends, and never outlives the
agent. A revoked agent gets no new one.

JWT-SVIDs cannot be signed by the CA: its key is Ed25519, and the JWT-SVID
specification allows RSA and ECDSA only. The mesh has an ES256 key for them
(``jwt.key``, 0600, beside ``ca.key``), made the first time one is needed,
and publishes it as a SPIFFE JWT bundle: a JWKS whose keys say
``"use": "jwt-svid"``, at ``/v1/jwks`` and ``/.well-known/jwks.json``. A
JWT-SVID lives at most :data:`JWT_TTL` and never past the agent's end. Both
kinds of issue are audited (``agent.svid``, ``agent.jwt``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from joserfc import jwt

from meshcore.errors import NotFound, PermissionDenied
from meshcore.identity import Claims, Identity, cert_pem
from meshcore.scopes import parse_scopes
from meshcore.wire.api import JwtSvid, WorkloadSvid

from .agents import authorized_by
from .authority import JwtKey
from .certificates import record_certificate, sign_timed
from .context import Context
from .rows import AgentRow

__all__ = ["JWT_TTL", "jwks", "jwt_svid", "workload_svid"]

JWT_TTL = timedelta(minutes=5)


def _jwt_key(ctx: Context) -> JwtKey:
    if ctx.jwt_key is None:
        ctx.jwt_key = JwtKey.load(ctx.data)
    return ctx.jwt_key


def jwks(ctx: Context) -> dict[str, Any]:
    """The mesh's JWT bundle (SPIFFE trust domain bundle format: a JWKS)."""
    return {"keys": [_jwt_key(ctx).public()]}


def _own_live_agent(ctx: Context, caller: Identity, agent_id: str, now: datetime) -> AgentRow:
    with ctx.store.transaction() as tx:
        row = tx.agent(agent_id)
    if row is None or row.node != caller.spiffe_id.name:
        raise NotFound(f"no agent {agent_id} on node {caller.spiffe_id.name}")
    if not row.live(now):
        raise PermissionDenied(f"agent {agent_id} is {row.end_reason or 'expired'}: it gets no SVID")
    return row


def workload_svid(ctx: Context, caller: Identity, agent_id: str, now: datetime) -> WorkloadSvid:
    """A fresh X509-SVID for a live agent of the calling node: its key, its claims, a short life."""
    row = _own_live_agent(ctx, caller, agent_id, now)
    public_key = x509.load_pem_x509_certificate(row.certificate.encode()).public_key()
    assert isinstance(public_key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey)
    sid = ctx.settings.spiffe_id("agent", row.id)
    claims = Claims(kind="agent", node=row.node, principal=row.principal, scopes=parse_scopes(row.scopes),
                    parent=row.parent, addresses=(row.ipv4, row.ipv6), name=row.name, grant=row.grant_id,
                    grant_signer=row.grant_signer)
    cert = sign_timed(ctx, public_key, sid, claims, now, min(ctx.svid_ttl, row.not_after - now))
    with ctx.store.transaction() as tx:
        serial = record_certificate(tx, cert, sid, row.node, now)
        tx.audit(now, str(caller.spiffe_id), "agent.svid", str(sid), principal=row.principal, serial=serial,
                 not_after=cert.not_valid_after_utc)
    ctx.metrics.identities_issued.labels("svid").inc()
    return WorkloadSvid(certificate=cert_pem(cert), expires=cert.not_valid_after_utc)


def jwt_svid(ctx: Context, caller: Identity, agent_id: str, audience: list[str], now: datetime) -> JwtSvid:
    """A JWT-SVID for a live agent of the calling node: ``sub`` its SPIFFE ID, idmesh's claims beside it."""
    row = _own_live_agent(ctx, caller, agent_id, now)
    key = _jwt_key(ctx)
    expires = min(now + JWT_TTL, row.not_after)
    sid = ctx.settings.spiffe_id("agent", row.id)
    claims: dict[str, object] = {
        "sub": str(sid), "aud": audience, "iat": int(now.timestamp()), "exp": int(expires.timestamp()),
              "principal": row.principal, "scopes": row.scopes, "authorized_by": authorized_by(row),
              "node": row.node}
    token = jwt.encode({"alg": "ES256", "kid": key.kid, "typ": "JWT"}, claims, key.key)
    with ctx.store.transaction() as tx:
        tx.audit(now, str(caller.spiffe_id), "agent.jwt", str(sid), principal=row.principal, audience=audience,
                 not_after=expires)
    ctx.metrics.identities_issued.labels("jwt").inc()
    return JwtSvid(token=token, expires=expires.replace(microsecond=0))
