"""The mesh CA, what pins it (its fingerprint), and the leaves it signs.

A leaf is assembled from pre-encoded DER around the per-leaf fields and
signed once (:class:`_LeafTemplate`); :func:`build_leaf_reference` builds the
same bytes with ``cryptography``'s builder, and a test proves they are equal.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import der
from ..errors import InvalidCertificate, InvalidInput
from .svid import CLAIMS_OID, Claims, PublicKey, SigningKey, SpiffeId


@dataclass(frozen=True)
class CertificateAuthority:
    """The mesh CA: its certificate and the key that signs for it."""

    cert: x509.Certificate
    key: SigningKey = field(repr=False)

    @cached_property
    def trust_domain(self) -> str:
        return trust_domain_of(self.cert)

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    @cached_property
    def authority_key_id(self) -> x509.AuthorityKeyIdentifier:
        ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    @cached_property
    def _leaf_template(self) -> _LeafTemplate:
        return _LeafTemplate.for_ca(self)


def _sign_hash(key: SigningKey | PublicKey) -> hashes.SHA256 | None:
    return None if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)) else hashes.SHA256()


def new_ca(trust_domain: str, key: SigningKey, now: datetime, ttl: timedelta = timedelta(days=3650)) -> CertificateAuthority:
    """A self-signed root for one trust domain; its URI SAN names the domain."""
    SpiffeId(trust_domain, "node", "x")  # validates the domain
    common_name = f"idmesh CA {trust_domain}"
    if len(common_name) > 64:  # X.520 upper bound; the URI SAN names the domain in full
        common_name = common_name[:61] + "..."
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "idmesh"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            critical=False,
        )
        .sign(key, _sign_hash(key))
    )
    return CertificateAuthority(cert, key)


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


_LEAF_KEY_USAGE = _key_usage(cert_sign=False)
_LEAF_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_LEAF_BASIC = x509.BasicConstraints(ca=False, path_length=None)
_EMPTY_NAME = x509.Name([])
# Leaves are valid from a little before ``now`` so a peer whose clock lags
# slightly does not refuse a certificate that was just issued.
CLOCK_SKEW = timedelta(seconds=30)


def new_serial() -> int:
    """159 random bits, positive, as RFC 5280 and the CA/B forum ask."""
    return int.from_bytes(os.urandom(20), "big") >> 1


def build_leaf(
    ca: CertificateAuthority,
    public_key: PublicKey,
    spiffe_id: SpiffeId,
    claims: Claims,
    now: datetime,
    ttl: timedelta,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[object, ...] = (),
    serial: int | None = None,
) -> x509.Certificate:
    """Issue an X509-SVID for ``spiffe_id``, never outliving the CA.

    ``dns_names``/``ip_addresses`` are only for the controller's TLS server
    certificate, which must also name the host nodes dial. Ed25519 leaves of
    an Ed25519 CA take the pre-encoded fast path; the result is identical to
    :func:`build_leaf_reference` (the unit tests compare the bytes).
    """
    if spiffe_id.trust_domain != ca.trust_domain:
        raise InvalidInput(f"{spiffe_id} is outside the trust domain {ca.trust_domain}")
    if claims.kind != spiffe_id.kind:
        raise InvalidInput(f"claims of kind {claims.kind} for {spiffe_id}")
    serial = new_serial() if serial is None else serial
    if not 0 < serial < 2**159:
        raise InvalidInput(f"certificate serial {serial:#x} must be positive and at most 159 bits")
    not_before = now - CLOCK_SKEW
    not_after = min(now + ttl, ca.cert.not_valid_after_utc)
    if (
        not dns_names
        and not ip_addresses
        and isinstance(ca.key, ed25519.Ed25519PrivateKey)
        and isinstance(public_key, ed25519.Ed25519PublicKey)
    ):
        return ca._leaf_template.build(ca.key, public_key, spiffe_id, claims, serial, not_before, not_after)
    return build_leaf_reference(
        ca, public_key, spiffe_id, claims, serial, not_before, not_after, dns_names, ip_addresses
    )


def build_leaf_reference(
    ca: CertificateAuthority,
    public_key: PublicKey,
    spiffe_id: SpiffeId,
    claims: Claims,
    serial: int,
    not_before: datetime,
    not_after: datetime,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[object, ...] = (),
) -> x509.Certificate:
    """The leaf profile written with ``cryptography``'s CertificateBuilder."""
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    sans += [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ip) for ip in ip_addresses]  # type: ignore[arg-type]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_EMPTY_NAME)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_LEAF_BASIC, critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(_LEAF_EKU, critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(ca.authority_key_id, critical=False)
        .add_extension(x509.UnrecognizedExtension(CLAIMS_OID, claims.encode()), critical=False)
    )
    return builder.sign(ca.key, _sign_hash(ca.key))


_ED25519_ALGORITHM = der.sequence(b"\x06\x03\x2b\x65\x70")  # id-Ed25519, no parameters
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # SPKI header before the 32 key bytes
_OID_SAN = bytes.fromhex("0603551d11")
_CRITICAL = bytes.fromhex("0101ff")


@dataclass(frozen=True)
class _LeafTemplate:
    """The DER of everything one Ed25519 CA's leaves have in common."""

    version_serial_prefix: bytes  # [0] { INTEGER 2 }
    issuer: bytes
    fixed_extensions_head: bytes  # basicConstraints, keyUsage, EKU
    fixed_extensions_tail: bytes  # authorityKeyIdentifier
    claims_oid: bytes

    @classmethod
    def for_ca(cls, ca: CertificateAuthority) -> _LeafTemplate:
        def ext_der(ext: x509.ExtensionType, critical: bool) -> bytes:
            # The library stays the authority on each extension value's DER.
            value = ext.public_bytes()
            oid = _oid_der(ext.oid)
            return der.sequence(oid, _CRITICAL if critical else b"", der.octet_string(value))

        return cls(
            version_serial_prefix=bytes.fromhex("a003020102"),
            issuer=ca.cert.subject.public_bytes(),
            fixed_extensions_head=ext_der(_LEAF_BASIC, True)
            + ext_der(_LEAF_KEY_USAGE, True)
            + ext_der(_LEAF_EKU, False),
            fixed_extensions_tail=ext_der(ca.authority_key_id, False),
            claims_oid=_oid_der(CLAIMS_OID),
        )

    def build(
        self,
        key: ed25519.Ed25519PrivateKey,
        public_key: ed25519.Ed25519PublicKey,
        spiffe_id: SpiffeId,
        claims: Claims,
        serial: int,
        not_before: datetime,
        not_after: datetime,
    ) -> x509.Certificate:
        san = der.sequence(der.tlv(0x86, str(spiffe_id).encode()))  # [6] uniformResourceIdentifier
        extensions = (
            self.fixed_extensions_head
            + der.sequence(_OID_SAN, _CRITICAL, der.octet_string(san))
            + self.fixed_extensions_tail
            + der.sequence(self.claims_oid, der.octet_string(claims.encode()))
        )
        tbs = der.sequence(
            self.version_serial_prefix,
            der.integer(serial),
            _ED25519_ALGORITHM,
            self.issuer,
            der.sequence(der.time(not_before), der.time(not_after)),
            der.sequence(),  # empty subject: the SPIFFE ID is in the critical SAN
            _ED25519_SPKI_PREFIX + public_key.public_bytes_raw(),
            der.tlv(0xA3, der.sequence(extensions)),
        )
        signature = key.sign(tbs)
        return x509.load_der_x509_certificate(
            der.sequence(tbs, _ED25519_ALGORITHM, der.tlv(0x03, b"\x00" + signature))
        )


def _oid_der(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return der.tlv(0x06, bytes(body))


def trust_domain_of(ca_cert: x509.Certificate) -> str:
    try:
        san = ca_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        (uri,) = san.get_values_for_type(x509.UniformResourceIdentifier)
    except (x509.ExtensionNotFound, ValueError) as exc:
        raise InvalidCertificate("CA certificate names no trust domain") from exc
    if not uri.startswith("spiffe://"):
        raise InvalidCertificate(f"CA certificate names no SPIFFE trust domain: {uri!r}")
    return uri[len("spiffe://") :].rstrip("/")


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER encoding, lower-case hex: what tokens pin."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
