"""Identities as X509-SVIDs: SPIFFE IDs, the idmesh claims extension, and the
build and verify of certificates.

Every leaf this module builds is a valid X509-SVID (SPIFFE X509-SVID spec §4,
§5): exactly one URI SAN holding the SPIFFE ID, ``CA:FALSE``, a critical
keyUsage with digitalSignature only, extendedKeyUsage serverAuth+clientAuth,
and — because the subject is empty — a critical SAN. What the mesh knows about
the identity (owner and tags of a node; principal, scopes and parent of an
agent; the node it lives on; its overlay addresses) rides in one non-critical
extension, :data:`CLAIMS_OID`, signed with the rest by the mesh CA, so a
receiving node can decide from the certificate alone.

Time and the signing key are passed in (``now``, ``ca.key``): tests use a fixed
clock, and the key could live in an HSM behind the same interface.

:mod:`.svid` holds the names and claims, :mod:`.authority` the CA and leaf
building, :mod:`.verify` the receiving side, :mod:`.pem` the encodings;
everything public is re-exported here.
"""

from __future__ import annotations

from .authority import (
    CLOCK_SKEW,
    CertificateAuthority,
    build_leaf,
    build_leaf_reference,
    fingerprint,
    new_ca,
    new_serial,
    trust_domain_of,
)
from .pem import build_csr, cert_pem, key_pem, load_certificate, load_csr, load_der_certificate
from .svid import CLAIMS_OID, IDMESH_ARC, NODE_NAME, Claims, Identity, Kind, PublicKey, SigningKey, SpiffeId, user_path
from .verify import verify_leaf

__all__ = [
    "CLAIMS_OID",
    "CLOCK_SKEW",
    "IDMESH_ARC",
    "NODE_NAME",
    "CertificateAuthority",
    "Claims",
    "Identity",
    "Kind",
    "PublicKey",
    "SigningKey",
    "SpiffeId",
    "build_csr",
    "build_leaf",
    "build_leaf_reference",
    "cert_pem",
    "fingerprint",
    "key_pem",
    "load_certificate",
    "load_csr",
    "load_der_certificate",
    "new_ca",
    "new_serial",
    "trust_domain_of",
    "user_path",
    "verify_leaf",
]
