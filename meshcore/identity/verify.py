"""Checking a leaf against the mesh CA and the X509-SVID rules: the receiving side of every identity."""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import SignatureAlgorithmOID

from .. import der
from ..errors import InvalidCertificate, InvalidInput
from .authority import trust_domain_of
from .svid import CLAIMS_OID, Claims, Identity, SpiffeId


def verify_leaf(cert: x509.Certificate, ca_cert: x509.Certificate, now: datetime) -> Identity:
    """Check a leaf against the mesh CA and the X509-SVID rules; say why not.

    Checks: issued and signed by the CA, inside its validity window at
    ``now``, CA:FALSE, keyUsage digitalSignature without cert/CRL signing,
    exactly one URI SAN that is a SPIFFE ID of the CA's trust domain, and
    claims whose kind matches the ID. Revocation is the caller's concern: it
    needs state (the controller's registry, a node's revocation list).
    """
    try:
        issuer = cert.issuer
    except (ValueError, TypeError) as exc:  # cryptography parses the name only now
        raise InvalidCertificate(f"malformed certificate issuer: {exc}") from exc
    if issuer != ca_cert.subject:
        raise InvalidCertificate("certificate was not issued by this mesh's CA")
    try:
        public = ca_cert.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            expected_algorithm = SignatureAlgorithmOID.ED25519
        elif isinstance(public, ec.EllipticCurvePublicKey):
            expected_algorithm = SignatureAlgorithmOID.ECDSA_WITH_SHA256
        else:
            raise InvalidCertificate("unsupported CA key type")
        if cert.signature_algorithm_oid != expected_algorithm:
            raise InvalidCertificate("certificate signature algorithm does not match the mesh CA key")
        # Neither the outer algorithm nor the signature's BIT STRING header is signed: both must be exact.
        if not cert.public_bytes(serialization.Encoding.DER).endswith(der.tlv(0x03, b"\x00" + cert.signature)):
            raise InvalidCertificate("certificate signature is not a whole-byte BIT STRING")
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise InvalidCertificate("certificate signature does not verify against the mesh CA") from exc
    if now < cert.not_valid_before_utc:
        raise InvalidCertificate(f"certificate is not valid before {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise InvalidCertificate(f"certificate expired at {cert.not_valid_after_utc.isoformat()}")
    try:
        ext = cert.extensions
        basic = ext.get_extension_for_class(x509.BasicConstraints).value
        usage = ext.get_extension_for_class(x509.KeyUsage).value
        san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
        raw_claims = ext.get_extension_for_oid(CLAIMS_OID).value
    except (x509.ExtensionNotFound, ValueError) as exc:
        raise InvalidCertificate(f"not an idmesh X509-SVID: {exc}") from exc
    if basic.ca:
        raise InvalidCertificate("not a leaf: basicConstraints CA:TRUE")
    if not usage.digital_signature or usage.key_cert_sign or usage.crl_sign:
        raise InvalidCertificate("keyUsage must be digitalSignature without certificate or CRL signing")
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise InvalidCertificate(f"an X509-SVID has exactly one URI SAN, this one has {len(uris)}")
    try:
        sid = SpiffeId.parse(uris[0])
    except InvalidInput as exc:
        raise InvalidCertificate(str(exc)) from exc
    domain = trust_domain_of(ca_cert)
    if sid.trust_domain != domain:
        raise InvalidCertificate(f"{sid} is outside the trust domain {domain}")
    assert isinstance(raw_claims, x509.UnrecognizedExtension)
    claims = Claims.decode(raw_claims.value)
    if claims.kind != sid.kind:
        raise InvalidCertificate(f"claims of kind {claims.kind} in a {sid.kind} certificate")
    return Identity(
        spiffe_id=sid,
        claims=claims,
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        public_key=cert.public_key(),  # type: ignore[arg-type]
    )
