"""The two steps every certificate the controller issues shares: signing, and recording its serial.

Enrollment, renewal and agent issuance each sign inside the transaction of
the change the certificate belongs to, and record the serial there too, so
authentication and revocation find every certificate that was ever handed
out. Signing time is a metric for first issuance only (enrollment, agents),
as it always was: renewals are not timed.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from cryptography import x509

from meshcore.identity import Claims, PublicKey, SpiffeId, build_leaf

from .context import Context
from .store import Tx

__all__ = ["record_certificate", "sign_timed"]


def sign_timed(ctx: Context, public_key: PublicKey, sid: SpiffeId, claims: Claims, now: datetime,
               ttl: timedelta) -> x509.Certificate:
    """A leaf for ``sid``; its signing time goes to ``idmesh_issuance_seconds`` under its kind."""
    t0 = time.perf_counter()
    cert = build_leaf(ctx.ca, public_key, sid, claims, now, ttl)
    ctx.metrics.issuance_seconds.labels(sid.kind).observe(time.perf_counter() - t0)
    return cert


def record_certificate(tx: Tx, cert: x509.Certificate, sid: SpiffeId, node: str, now: datetime) -> str:
    """Store ``cert`` as issued to ``sid`` (a node, or an agent of ``node``); its serial in hex."""
    serial = format(cert.serial_number, "x")
    tx.insert_certificate(serial, str(sid), sid.kind, node, now, cert.not_valid_after_utc)
    return serial
