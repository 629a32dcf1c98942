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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from . import der
from .errors import InvalidCertificate, InvalidInput
from .scopes import Scope, parse_scopes

__all__ = [
    "CLAIMS_OID",
    "CertificateAuthority",
    "Claims",
    "Identity",
    "Kind",
    "SpiffeId",
    "build_csr",
    "build_leaf",
    "build_leaf_reference",
    "cert_pem",
    "fingerprint",
    "key_pem",
    "load_certificate",
    "load_csr",
    "new_ca",
    "new_serial",
    "trust_domain_of",
    "verify_leaf",
]

# 2.25 is the UUID arc (ITU-T X.667): our arc is UUID a3000e26-fd5a-4a2f-927d-42e5f8984389.
# Arc .1 holds the claims of an identity; further arcs are free for later use.
IDMESH_ARC = "2.25.216664450355754775089989304130184168329"
CLAIMS_OID = x509.ObjectIdentifier(IDMESH_ARC + ".1")

Kind = Literal["node", "agent", "admin", "controller"]
_KINDS = ("node", "agent", "admin", "controller")
SigningKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}\Z")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")
NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


@dataclass(frozen=True)
class SpiffeId:
    """``spiffe://<trust_domain>/<kind>/<name>``, the only URI SAN of a leaf."""

    trust_domain: str
    kind: Kind
    name: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.match(self.trust_domain) or self.trust_domain.strip(".") != self.trust_domain:
            raise InvalidInput(f"invalid trust domain {self.trust_domain!r}: use a DNS-like name such as acme.mesh")
        if self.kind not in _KINDS:
            raise InvalidInput(f"invalid identity kind {self.kind!r}")
        if not _NAME.match(self.name) or self.name in (".", ".."):
            raise InvalidInput(f"invalid {self.kind} name {self.name!r}")

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/{self.kind}/{self.name}"

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        m = re.match(r"^spiffe://([^/]+)/([^/]+)/([^/]+)\Z", uri)
        if not m or m.group(2) not in _KINDS:
            raise InvalidInput(f"not an idmesh SPIFFE ID: {uri!r}")
        return cls(m.group(1), m.group(2), m.group(3))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Claims:
    """What the mesh asserts about an identity, carried in :data:`CLAIMS_OID`.

    Empty fields are left out of the encoding. ``node`` is the node an agent
    runs on (for a node: itself); ``addresses`` are the identity's own overlay
    addresses; ``blocks`` are the prefixes a node may source agents from.
    """

    kind: Kind
    node: str | None = None
    owner: str | None = None
    tags: tuple[str, ...] = ()
    principal: str | None = None
    scopes: tuple[Scope, ...] = ()
    parent: str | None = None
    addresses: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()
    name: str | None = None  # an agent's name, what policy's ``agent:`` selector matches

    def encode(self) -> bytes:
        """DER UTF8String holding canonical JSON (sorted keys, no spaces)."""
        doc: dict[str, object] = {"v": 1, "kind": self.kind}
        for key in ("node", "owner", "principal", "parent", "name"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        for key in ("tags", "addresses", "blocks"):
            if getattr(self, key):
                doc[key] = list(getattr(self, key))
        if self.scopes:
            doc["scopes"] = [str(s) for s in self.scopes]
        return der.utf8_string(json.dumps(doc, sort_keys=True, separators=(",", ":")))

    @classmethod
    def decode(cls, raw: bytes) -> Claims:
        try:
            if raw[:1] != b"\x0c":
                raise ValueError("not a UTF8String")
            size, offset = der.read_length(raw, 1)
            if offset + size != len(raw):
                raise ValueError("trailing bytes")
            doc = json.loads(raw[offset:].decode())
            if not isinstance(doc, dict):
                raise TypeError("not a JSON object")
            if doc.get("v") != 1 or doc.get("kind") not in _KINDS:
                raise ValueError("unknown claims version or kind")
            for key in ("node", "owner", "principal", "parent", "name"):
                if not isinstance(doc.get(key, ""), str):
                    raise TypeError(f"{key} is not a string")
            for key in ("tags", "scopes", "addresses", "blocks"):
                value = doc.get(key, [])
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise TypeError(f"{key} is not a list of strings")
            return cls(
                kind=doc["kind"],
                node=doc.get("node"),
                owner=doc.get("owner"),
                tags=tuple(doc.get("tags", ())),
                principal=doc.get("principal"),
                scopes=parse_scopes(doc.get("scopes", ())),
                parent=doc.get("parent"),
                addresses=tuple(doc.get("addresses", ())),
                blocks=tuple(doc.get("blocks", ())),
                name=doc.get("name"),
            )
        except (ValueError, KeyError, TypeError, InvalidInput) as exc:
            raise InvalidCertificate(f"malformed idmesh claims extension: {exc}") from exc


@dataclass(frozen=True)
class Identity:
    """A leaf certificate that :func:`verify_leaf` has checked."""

    spiffe_id: SpiffeId
    claims: Claims
    serial: int
    not_before: datetime
    not_after: datetime
    public_key: PublicKey = field(repr=False, compare=False)

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")


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


def build_csr(key: SigningKey) -> str:
    """A PEM CSR: it proves possession of ``key``; the controller decides the rest."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(_EMPTY_NAME).sign(key, _sign_hash(key))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def load_csr(pem: str) -> ed25519.Ed25519PublicKey:
    """Parse a PEM CSR, check its self-signature, return its Ed25519 key."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as exc:
        raise InvalidInput(f"malformed certificate signing request: {exc}") from exc
    key = csr.public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise InvalidInput("certificate signing request must carry an Ed25519 key")
    if not csr.is_signature_valid:
        raise InvalidInput("certificate signing request signature does not verify (no proof of possession)")
    return key


def load_certificate(pem: bytes | str) -> x509.Certificate:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(data)
    except (ValueError, x509.InvalidVersion) as exc:
        raise InvalidCertificate(f"malformed certificate: {exc}") from exc


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: SigningKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
