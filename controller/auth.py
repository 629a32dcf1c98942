"""Who is calling: the identity behind a TLS client certificate, and what kind it must be.

Every API call but enrollment and the CA certificate goes through here, so
the rules are in one place: the TLS layer has checked the chain, this adds
the X509-SVID profile, the claims, and whether the controller still honours
the certificate (revoked, or a node that was removed or has renewed since).
"""

from __future__ import annotations

from datetime import datetime

from cryptography import x509

from meshcore.errors import InvalidCertificate, PermissionDenied
from meshcore.identity import Identity, verify_leaf

from .context import Context

__all__ = ["VERIFIED_LEAVES", "authenticate", "require", "require_admin_or_node"]

VERIFIED_LEAVES = 4096
"""Client certificates whose signature and profile were checked, kept by their DER: a node's every call
presents the same one, and checking its signature again is a quarter of a millisecond. The window is
checked on each use; revocation and membership are asked of the store on every call."""


def authenticate(ctx: Context, cert_der: bytes | None, now: datetime) -> Identity:
    """The identity behind a TLS client certificate, or PermissionDenied."""
    if not cert_der:
        raise PermissionDenied("this call needs a client certificate (admin credential or node certificate)")
    ident = ctx.verified_leaves.get(cert_der)
    if ident is None or not ident.not_before <= now <= ident.not_after:
        try:
            ident = verify_leaf(x509.load_der_x509_certificate(cert_der), ctx.ca.cert, now)
        except (InvalidCertificate, ValueError) as exc:
            raise PermissionDenied(f"client certificate refused: {exc}") from exc
        if len(ctx.verified_leaves) >= VERIFIED_LEAVES:
            ctx.verified_leaves.clear()
        ctx.verified_leaves[cert_der] = ident
    with ctx.store.transaction() as tx:
        revoked = tx.certificate_revoked(ident.serial_hex)
        serial = tx.node_cert_serial(ident.spiffe_id.name) if ident.spiffe_id.kind == "node" else None
    if revoked is None or revoked:
        raise PermissionDenied(f"client certificate of {ident.spiffe_id} has been revoked")
    if ident.spiffe_id.kind == "node" and serial != ident.serial_hex:
        raise PermissionDenied(f"{ident.spiffe_id} is no longer a member of this mesh")
    return ident


def require(ident: Identity, kind: str) -> None:
    if ident.spiffe_id.kind != kind:
        raise PermissionDenied(f"{ident.spiffe_id} may not make this call ({kind} only)")


def require_admin_or_node(ident: Identity) -> None:
    """For calls both make (agents: the admin sees all, a node its own); anyone else is told "admin only"."""
    if ident.spiffe_id.kind != "node":
        require(ident, "admin")
