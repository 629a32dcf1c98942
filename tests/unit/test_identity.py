"""The identity core: the leaf fast path equals the reference builder byte for
byte, every leaf is an X509-SVID, and verify_leaf refuses what it must.

All times come from a fixed clock; keys are real, nothing is mocked.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import warnings
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, SignatureAlgorithmOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcore import der
from meshcore.errors import InvalidCertificate, InvalidInput
from meshcore.identity import (
    CLAIMS_OID,
    CLOCK_SKEW,
    NODE_NAME,
    CertificateAuthority,
    Claims,
    SpiffeId,
    build_csr,
    build_leaf,
    build_leaf_reference,
    cert_pem,
    fingerprint,
    load_certificate,
    load_csr,
    new_ca,
    new_serial,
    trust_domain_of,
    verify_leaf,
)
from meshcore.scopes import parse_scopes

NOW = datetime(2031, 3, 4, 5, 6, 7, tzinfo=UTC)
DOMAIN = "acme.mesh"
TTL = timedelta(minutes=15)

NODE_CLAIMS = Claims(
    kind="node",
    node="web-1",
    owner="ops@acme.com",
    tags=("prod", "web"),
    addresses=("100.64.0.65", "fd12:3456:789a:1::1"),
    blocks=("100.64.0.64/26", "fd12:3456:789a:1::/64"),
)
AGENT_CLAIMS = Claims(
    kind="agent",
    node="web-1",
    principal="nikita@acme.com",
    scopes=parse_scopes(["db:read", "web:*"]),
    parent="a-parent-7",
    addresses=("100.64.0.66", "fd12:3456:789a:1::2"),
)
NODE_ID = SpiffeId(DOMAIN, "node", "web-1")
AGENT_ID = SpiffeId(DOMAIN, "agent", "a-0001")

CRITICAL_SAN_DER = bytes.fromhex("0603551d110101ff")  # OID subjectAltName, critical TRUE


def make_ca(domain: str = DOMAIN, now: datetime = NOW, ttl: timedelta = timedelta(days=3650)) -> CertificateAuthority:
    return new_ca(domain, ed25519.Ed25519PrivateKey.generate(), now, ttl)


def new_key() -> ed25519.Ed25519PublicKey:
    return ed25519.Ed25519PrivateKey.generate().public_key()


def to_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def expected_window(ca: CertificateAuthority, now: datetime, ttl: timedelta) -> tuple[datetime, datetime]:
    """What build_leaf promises, computed independently of it."""
    return now - CLOCK_SKEW, min(now + ttl, ca.cert.not_valid_after_utc)


def assert_fast_equals_reference(
    ca: CertificateAuthority,
    sid: SpiffeId,
    claims: Claims,
    serial: int,
    now: datetime,
    ttl: timedelta = TTL,
) -> x509.Certificate:
    key = new_key()
    fast = build_leaf(ca, key, sid, claims, now, ttl, serial=serial)
    not_before, not_after = expected_window(ca, now, ttl)
    reference = build_leaf_reference(ca, key, sid, claims, serial, not_before, not_after)
    assert to_der(fast) == to_der(reference)
    return fast


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return make_ca()


# A CA valid 2000..2100: leaf times inside it use both UTCTime and GeneralizedTime.
CENTURY_START = datetime(2000, 1, 1, tzinfo=UTC)
CENTURY_CA = make_ca(now=CENTURY_START, ttl=timedelta(days=365 * 100 + 24))


# ---------------------------------------------------------------------------
# The fast path equals cryptography's CertificateBuilder, byte for byte


HIGH_BIT_SERIALS = [0x80, 0xFF, 0x8000, 0x80FFFF, 2**151, 2**152 - 1]
SERIALS = [1, 0x7F, 0x100, 2**158, 2**159 - 1, *HIGH_BIT_SERIALS]


@pytest.mark.parametrize("serial", SERIALS, ids=hex)
@pytest.mark.parametrize("sid, claims", [(NODE_ID, NODE_CLAIMS), (AGENT_ID, AGENT_CLAIMS)], ids=["node", "agent"])
def test_fast_path_is_byte_identical_to_reference(
    ca: CertificateAuthority, sid: SpiffeId, claims: Claims, serial: int
) -> None:
    cert = assert_fast_equals_reference(ca, sid, claims, serial, NOW)
    assert cert.serial_number == serial


def test_the_comparisons_exercise_the_fast_path() -> None:
    """Guard against the equality tests passing because both sides are the reference builder."""
    ca = make_ca()
    build_leaf(ca, new_key(), NODE_ID, NODE_CLAIMS, NOW, TTL, dns_names=("web-1.acme.mesh",))
    assert "_leaf_template" not in vars(ca)  # host names go through the reference builder
    build_leaf(ca, new_key(), NODE_ID, NODE_CLAIMS, NOW, TTL)
    assert "_leaf_template" in vars(ca)  # the pre-encoded template was built and used


def test_high_bit_serials_are_encoded_with_a_leading_zero(ca: CertificateAuthority) -> None:
    for serial in HIGH_BIT_SERIALS:
        content = serial.to_bytes((serial.bit_length() + 7) // 8, "big")
        assert content[0] & 0x80
        cert = assert_fast_equals_reference(ca, AGENT_ID, AGENT_CLAIMS, serial, NOW)
        assert b"\x02" + bytes([len(content) + 1]) + b"\x00" + content in cert.tbs_certificate_bytes


def test_fast_path_is_byte_identical_for_random_serials(ca: CertificateAuthority) -> None:
    for _ in range(50):
        assert_fast_equals_reference(ca, AGENT_ID, AGENT_CLAIMS, new_serial(), NOW)


@pytest.mark.parametrize("serial", [0, 2**159, 2**160 + 1], ids=hex)
def test_both_builders_refuse_serials_x509_does_not_allow(ca: CertificateAuthority, serial: int) -> None:
    with pytest.raises(InvalidInput, match="serial"):
        build_leaf(ca, new_key(), AGENT_ID, AGENT_CLAIMS, NOW, TTL, serial=serial)
    with pytest.raises(ValueError):
        build_leaf_reference(ca, new_key(), AGENT_ID, AGENT_CLAIMS, serial, NOW, NOW + TTL)


def test_new_serial_is_positive_and_at_most_159_bits() -> None:
    serials = {new_serial() for _ in range(2000)}
    assert len(serials) == 2000
    assert all(0 < s < 2**159 for s in serials)
    assert max(s.bit_length() for s in serials) > 150


UTC_TIME, GENERALIZED_TIME = 0x17, 0x18


@pytest.mark.parametrize(
    "now, tags",
    [
        (NOW, (UTC_TIME, UTC_TIME)),
        (datetime(2049, 12, 31, 23, 55, tzinfo=UTC), (UTC_TIME, GENERALIZED_TIME)),  # spans 2050
        (datetime(2050, 1, 1, 0, 0, 30, tzinfo=UTC), (GENERALIZED_TIME, GENERALIZED_TIME)),
        (datetime(2050, 1, 1, 0, 0, 29, tzinfo=UTC), (UTC_TIME, GENERALIZED_TIME)),  # nb 2049-12-31T23:59:59
        (datetime(2077, 7, 7, 7, 7, 7, tzinfo=UTC), (GENERALIZED_TIME, GENERALIZED_TIME)),
        # cryptography refuses dates before 1950, so the earliest leaf starts at 1950-01-01T00:00:00.
        (datetime(1950, 1, 1, 0, 0, 30, tzinfo=UTC), (UTC_TIME, UTC_TIME)),
    ],
    ids=str,
)
def test_fast_path_encodes_validity_like_reference_around_2050(now: datetime, tags: tuple[int, int]) -> None:
    ca = make_ca(now=now + timedelta(minutes=5))  # the CA's own validity starts 5 minutes before its `now`
    cert = assert_fast_equals_reference(ca, AGENT_ID, AGENT_CLAIMS, new_serial(), now)
    not_before, not_after = expected_window(ca, now, TTL)
    validity = der.sequence(der.time(not_before), der.time(not_after))
    assert validity in cert.tbs_certificate_bytes
    assert (validity[2], validity[2 + 2 + validity[3]]) == tags
    assert cert.not_valid_before_utc == not_before
    assert cert.not_valid_after_utc == not_after


def test_fast_path_uses_utc_for_a_clock_in_another_time_zone(ca: CertificateAuthority) -> None:
    local_now = NOW.astimezone(timezone(timedelta(hours=2, minutes=30)))
    cert = assert_fast_equals_reference(ca, AGENT_ID, AGENT_CLAIMS, 12345, local_now)
    assert cert.not_valid_before_utc == NOW - CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + TTL


def test_fast_path_drops_sub_second_precision_like_reference(ca: CertificateAuthority) -> None:
    now = NOW.replace(microsecond=999_999)
    cert = assert_fast_equals_reference(ca, AGENT_ID, AGENT_CLAIMS, 77, now)
    assert cert.not_valid_before_utc == (NOW - CLOCK_SKEW).replace(microsecond=0)


@pytest.mark.parametrize("min_size, max_size", [(128, 255), (256, 65535), (65536, 200_000)])
def test_fast_path_handles_every_der_length_form_in_claims(
    ca: CertificateAuthority, min_size: int, max_size: int
) -> None:
    tag_count = min_size // 12  # each '"tag-00000",' is 12 bytes
    while True:
        claims = Claims(kind="node", node="web-1", tags=tuple(f"tag-{i:05d}" for i in range(tag_count)))
        if len(claims.encode()) >= min_size:
            break
        tag_count += 1
    assert min_size <= len(claims.encode()) <= max_size
    cert = assert_fast_equals_reference(ca, NODE_ID, claims, new_serial(), NOW)
    assert verify_leaf(cert, ca.cert, NOW).claims == claims


def test_fast_path_handles_the_longest_spiffe_ids() -> None:
    domain = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 63])  # 255 characters
    ca = make_ca(domain)  # its common name is cut to X.520's 64 characters; the SAN names the domain whole
    assert trust_domain_of(ca.cert) == domain
    for sid in (SpiffeId(domain, "agent", "x" * 128), SpiffeId(domain, "node", "n" * 128)):
        assert len(str(sid).encode()) > 255
        claims = AGENT_CLAIMS if sid.kind == "agent" else NODE_CLAIMS
        cert = assert_fast_equals_reference(ca, sid, claims, new_serial(), NOW)
        assert verify_leaf(cert, ca.cert, NOW).spiffe_id == sid


def test_leaf_never_outlives_its_ca() -> None:
    ca = make_ca(ttl=timedelta(days=1))
    cert = assert_fast_equals_reference(ca, NODE_ID, NODE_CLAIMS, 9, NOW, ttl=timedelta(days=365))
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc


# Strategies: short texts keep examples quick; the dedicated tests above cover length forms.
_names = st.from_regex(r"[A-Za-z0-9._-]{1,40}", fullmatch=True).filter(lambda s: s not in (".", ".."))
_text = st.text(max_size=30)
_opt_text = st.none() | _text
_scope_segment = st.sampled_from(["*", "db", "web", "read", "write", "deploy", "a.b-c_9"])
_scopes = st.lists(st.tuples(_scope_segment, _scope_segment).map(":".join), max_size=6).map(parse_scopes)
_kinds = st.sampled_from(["node", "agent", "admin", "controller"])


@st.composite
def claims_strategy(draw: st.DrawFn, kind: st.SearchStrategy[str] = _kinds) -> Claims:
    return Claims(
        kind=draw(kind),  # type: ignore[arg-type]
        node=draw(_opt_text),
        owner=draw(_opt_text),
        tags=tuple(draw(st.lists(_text, max_size=5))),
        principal=draw(_opt_text),
        scopes=draw(_scopes),
        parent=draw(_opt_text),
        addresses=tuple(draw(st.lists(_text, max_size=4))),
        blocks=tuple(draw(st.lists(_text, max_size=3))),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["node", "agent"]),
    name=_names,
    data=st.data(),
    serial=st.integers(min_value=1, max_value=2**159 - 1),
    now=st.datetimes(
        min_value=datetime(2000, 1, 2),
        max_value=datetime(2099, 12, 1),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=5, minutes=45))]),
    ),
    ttl=st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=800)),
)
def test_fast_path_equals_reference_for_any_claims_serial_and_date(
    kind: str, name: str, data: st.DataObject, serial: int, now: datetime, ttl: timedelta
) -> None:
    claims = data.draw(claims_strategy(st.just(kind)))
    sid = SpiffeId(DOMAIN, kind, name)  # type: ignore[arg-type]
    assert_fast_equals_reference(CENTURY_CA, sid, claims, serial, now, ttl)


# ---------------------------------------------------------------------------
# Every leaf is a valid X509-SVID


def assert_x509_svid(
    cert: x509.Certificate, ca: CertificateAuthority, sid: SpiffeId, claims: Claims, dns: tuple[str, ...] = ()
) -> None:
    assert cert.version == x509.Version.v3
    assert cert.issuer == ca.cert.subject
    assert cert.subject == x509.Name([])
    assert 0 < cert.serial_number < 2**159

    ext = cert.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical, "the subject is empty, so the SAN must be critical"
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(sid)]
    assert san.value.get_values_for_type(x509.DNSName) == list(dns)

    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False and basic.value.path_length is None

    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not any(
        getattr(usage.value, flag)
        for flag in (
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
        )
    )

    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}

    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier)
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert not aki.critical and aki.value.key_identifier == ski.digest

    raw_claims = ext.get_extension_for_oid(CLAIMS_OID)
    assert not raw_claims.critical
    assert isinstance(raw_claims.value, x509.UnrecognizedExtension)
    assert Claims.decode(raw_claims.value.value) == claims

    assert {e.oid for e in ext} == {
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        CLAIMS_OID,
    }
    assert cert.not_valid_after_utc <= ca.cert.not_valid_after_utc


@pytest.mark.parametrize("sid, claims", [(NODE_ID, NODE_CLAIMS), (AGENT_ID, AGENT_CLAIMS)], ids=["node", "agent"])
def test_every_ed25519_leaf_is_an_x509_svid(ca: CertificateAuthority, sid: SpiffeId, claims: Claims) -> None:
    cert = build_leaf(ca, new_key(), sid, claims, NOW, TTL)
    assert_x509_svid(cert, ca, sid, claims)
    assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ED25519
    # The empty subject is the two bytes of an empty SEQUENCE, and the SAN is marked critical.
    assert b"\x30\x00" + b"\x30\x2a\x30\x05\x06\x03\x2b\x65\x70" in cert.tbs_certificate_bytes
    assert CRITICAL_SAN_DER in cert.tbs_certificate_bytes


def test_controller_leaf_with_dns_and_ip_names_is_an_x509_svid(ca: CertificateAuthority) -> None:
    sid = SpiffeId(DOMAIN, "controller", "controller")
    claims = Claims(kind="controller")
    cert = build_leaf(
        ca,
        new_key(),
        sid,
        claims,
        NOW,
        TTL,
        dns_names=("ctl.acme.mesh",),
        ip_addresses=(ipaddress.ip_address("10.0.0.1"),),
    )
    assert_x509_svid(cert, ca, sid, claims, dns=("ctl.acme.mesh",))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]
    assert verify_leaf(cert, ca.cert, NOW).spiffe_id == sid


def test_ecdsa_ca_issues_the_same_profile_and_verifies() -> None:
    ca = new_ca(DOMAIN, ec.generate_private_key(ec.SECP256R1()), NOW)
    cert = build_leaf(ca, ec.generate_private_key(ec.SECP256R1()).public_key(), AGENT_ID, AGENT_CLAIMS, NOW, TTL)
    assert_x509_svid(cert, ca, AGENT_ID, AGENT_CLAIMS)
    assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    assert verify_leaf(cert, ca.cert, NOW).claims == AGENT_CLAIMS


def test_ca_certificate_names_its_trust_domain_and_may_only_sign(ca: CertificateAuthority) -> None:
    assert trust_domain_of(ca.cert) == DOMAIN
    assert ca.trust_domain == DOMAIN
    basic = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ca.cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign and not usage.value.digital_signature


def test_new_ca_refuses_an_invalid_trust_domain() -> None:
    with pytest.raises(InvalidInput, match="trust domain"):
        make_ca("Acme Mesh")


# ---------------------------------------------------------------------------
# verify_leaf accepts a good leaf and refuses everything else, saying why


def test_verify_leaf_returns_the_identity_in_the_certificate(ca: CertificateAuthority) -> None:
    key = new_key()
    cert = build_leaf(ca, key, AGENT_ID, AGENT_CLAIMS, NOW, TTL, serial=0xABC)
    ident = verify_leaf(cert, ca.cert, NOW)
    assert ident.spiffe_id == AGENT_ID
    assert ident.claims == AGENT_CLAIMS
    assert ident.serial == 0xABC and ident.serial_hex == "abc"
    assert (ident.not_before, ident.not_after) == (NOW - CLOCK_SKEW, NOW + TTL)
    assert ident.public_key.public_bytes_raw() == key.public_bytes_raw()  # type: ignore[union-attr]


def test_verify_leaf_accepts_the_exact_ends_of_the_validity_window(ca: CertificateAuthority) -> None:
    cert = build_leaf(ca, new_key(), NODE_ID, NODE_CLAIMS, NOW, TTL)
    verify_leaf(cert, ca.cert, NOW - CLOCK_SKEW)
    verify_leaf(cert, ca.cert, NOW + TTL)


def test_verify_leaf_refuses_a_leaf_of_a_foreign_ca_with_the_same_name(ca: CertificateAuthority) -> None:
    impostor = make_ca()
    assert impostor.cert.subject == ca.cert.subject
    cert = build_leaf(impostor, new_key(), NODE_ID, NODE_CLAIMS, NOW, TTL)
    with pytest.raises(InvalidCertificate, match="signature does not verify"):
        verify_leaf(cert, ca.cert, NOW)


def test_verify_leaf_refuses_a_leaf_of_another_mesh(ca: CertificateAuthority) -> None:
    other = make_ca("other.mesh")
    cert = build_leaf(other, new_key(), SpiffeId("other.mesh", "node", "web-1"), NODE_CLAIMS, NOW, TTL)
    with pytest.raises(InvalidCertificate, match="not issued by this mesh's CA"):
        verify_leaf(cert, ca.cert, NOW)


def test_verify_leaf_refuses_an_expired_leaf(ca: CertificateAuthority) -> None:
    cert = build_leaf(ca, new_key(), NODE_ID, NODE_CLAIMS, NOW, TTL)
    with pytest.raises(InvalidCertificate, match="expired at"):
        verify_leaf(cert, ca.cert, NOW + TTL + timedelta(seconds=1))


def test_verify_leaf_refuses_a_leaf_that_is_not_yet_valid(ca: CertificateAuthority) -> None:
    cert = build_leaf(ca, new_key(), NODE_ID, NODE_CLAIMS, NOW, TTL)
    with pytest.raises(InvalidCertificate, match="not valid before"):
        verify_leaf(cert, ca.cert, NOW - CLOCK_SKEW - timedelta(seconds=1))


def _tampered(cert: x509.Certificate, position: int, mask: int) -> x509.Certificate | None:
    raw = bytearray(to_der(cert))
    raw[position] ^= mask
    with warnings.catch_warnings():
        # A serial turned negative loads with a deprecation warning; verify_leaf must still refuse it.
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            return x509.load_der_x509_certificate(bytes(raw))
        except (ValueError, x509.InvalidVersion):
            return None  # the parser already refuses it


# cryptography warns while parsing some tampered issuer names; verify_leaf must still refuse them.
TAMPERED_NAME_WARNING = "ignore:Attribute's length must be:UserWarning"


@pytest.mark.filterwarnings(TAMPERED_NAME_WARNING)
def test_verify_leaf_refuses_every_single_byte_change(ca: CertificateAuthority) -> None:
    cert = build_leaf(ca, new_key(), AGENT_ID, AGENT_CLAIMS, NOW, TTL)
    refused = 0
    for position in range(len(to_der(cert))):
        for mask in (0x01, 0x80, 0xFF):
            tampered = _tampered(cert, position, mask)
            if tampered is None:
                continue
            with pytest.raises(InvalidCertificate):
                verify_leaf(tampered, ca.cert, NOW)
            refused += 1
    assert refused > len(to_der(cert))  # most changes parse and must be caught by verify_leaf itself


TAMPER_CA = make_ca()
TAMPER_LEAF = build_leaf(TAMPER_CA, new_key(), AGENT_ID, AGENT_CLAIMS, NOW, TTL)
TAMPER_DER = to_der(TAMPER_LEAF)


@pytest.mark.filterwarnings(TAMPERED_NAME_WARNING)
@settings(max_examples=300, deadline=None)
@given(data=st.data(), mask=st.integers(min_value=1, max_value=255))
def test_verify_leaf_refuses_any_tampered_byte(data: st.DataObject, mask: int) -> None:
    position = data.draw(st.integers(min_value=0, max_value=len(TAMPER_DER) - 1))
    tampered = _tampered(TAMPER_LEAF, position, mask)
    if tampered is not None:
        with pytest.raises(InvalidCertificate):
            verify_leaf(tampered, TAMPER_CA.cert, NOW)


def test_verify_leaf_refuses_a_changed_outer_signature_algorithm(ca: CertificateAuthority) -> None:
    cert = build_leaf(ca, new_key(), AGENT_ID, AGENT_CLAIMS, NOW, TTL)
    raw = to_der(cert)
    tbs = cert.tbs_certificate_bytes
    outer_algorithm = raw.index(b"\x30\x05\x06\x03\x2b\x65\x70", raw.index(tbs) + len(tbs))
    ed448 = raw[:outer_algorithm] + b"\x30\x05\x06\x03\x2b\x65\x71" + raw[outer_algorithm + 7 :]
    with pytest.raises(InvalidCertificate, match="signature algorithm"):
        verify_leaf(x509.load_der_x509_certificate(ed448), ca.cert, NOW)


def test_verify_leaf_refuses_the_ca_certificate_presented_as_a_leaf(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidCertificate):
        verify_leaf(ca.cert, ca.cert, NOW)


LEAF_BASIC = x509.BasicConstraints(ca=False, path_length=None)


def _custom_leaf(
    ca: CertificateAuthority,
    *,
    uris: tuple[str, ...] = (str(NODE_ID),),
    claims: x509.ExtensionType | None = None,
    basic: x509.BasicConstraints = LEAF_BASIC,
    cert_sign: bool = False,
) -> x509.Certificate:
    """A certificate the CA signed but build_leaf would never produce."""
    usage = x509.KeyUsage(True, False, False, False, False, cert_sign, cert_sign, False, False)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(new_key())
        .serial_number(new_serial())
        .not_valid_before(NOW - CLOCK_SKEW)
        .not_valid_after(NOW + TTL)
        .add_extension(basic, critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True)
    )
    if claims is None:
        claims = x509.UnrecognizedExtension(CLAIMS_OID, NODE_CLAIMS.encode())
    builder = builder.add_extension(claims, critical=False)
    return builder.sign(ca.key, None)


def test_custom_leaf_helper_builds_an_acceptable_leaf(ca: CertificateAuthority) -> None:
    assert verify_leaf(_custom_leaf(ca), ca.cert, NOW).spiffe_id == NODE_ID


def test_verify_leaf_refuses_a_ca_true_certificate_even_with_claims(ca: CertificateAuthority) -> None:
    cert = _custom_leaf(ca, basic=x509.BasicConstraints(ca=True, path_length=None), cert_sign=True)
    with pytest.raises(InvalidCertificate, match="CA:TRUE"):
        verify_leaf(cert, ca.cert, NOW)


def test_verify_leaf_refuses_a_leaf_allowed_to_sign_certificates(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidCertificate, match="keyUsage"):
        verify_leaf(_custom_leaf(ca, cert_sign=True), ca.cert, NOW)


def test_verify_leaf_refuses_two_uri_sans(ca: CertificateAuthority) -> None:
    cert = _custom_leaf(ca, uris=(str(NODE_ID), str(SpiffeId(DOMAIN, "node", "web-2"))))
    with pytest.raises(InvalidCertificate, match="exactly one URI SAN, this one has 2"):
        verify_leaf(cert, ca.cert, NOW)


def test_verify_leaf_refuses_a_leaf_without_a_uri_san(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidCertificate, match="has 0"):
        verify_leaf(_custom_leaf(ca, uris=()), ca.cert, NOW)


def test_verify_leaf_refuses_a_uri_that_is_not_an_idmesh_spiffe_id(ca: CertificateAuthority) -> None:
    for uri in ("https://acme.mesh/node/web-1", "spiffe://acme.mesh/pod/web-1", "spiffe://acme.mesh/node/web-1\n"):
        with pytest.raises(InvalidCertificate, match="not an idmesh SPIFFE ID|invalid"):
            verify_leaf(_custom_leaf(ca, uris=(uri,)), ca.cert, NOW)


def test_verify_leaf_refuses_a_spiffe_id_of_another_trust_domain(ca: CertificateAuthority) -> None:
    foreign = SpiffeId("other.mesh", "node", "web-1")
    cert = build_leaf_reference(ca, new_key(), foreign, NODE_CLAIMS, new_serial(), NOW, NOW + TTL)
    with pytest.raises(InvalidCertificate, match="outside the trust domain acme.mesh"):
        verify_leaf(cert, ca.cert, NOW)


def test_verify_leaf_refuses_claims_of_another_kind(ca: CertificateAuthority) -> None:
    cert = build_leaf_reference(ca, new_key(), AGENT_ID, NODE_CLAIMS, new_serial(), NOW, NOW + TTL)
    with pytest.raises(InvalidCertificate, match="claims of kind node in a agent certificate"):
        verify_leaf(cert, ca.cert, NOW)


def test_verify_leaf_refuses_a_leaf_without_claims(ca: CertificateAuthority) -> None:
    cert = _custom_leaf(ca, claims=x509.SubjectKeyIdentifier(b"\x01" * 20))
    with pytest.raises(InvalidCertificate, match="not an idmesh X509-SVID"):
        verify_leaf(cert, ca.cert, NOW)


MALFORMED_CLAIMS = {
    "empty": b"",
    "not a UTF8String": b"\x04\x02{}",
    "no length": b"\x0c",
    "truncated": der.utf8_string('{"kind":"node","v":1}')[:-1],
    "trailing bytes": der.utf8_string('{"kind":"node","v":1}') + b"\x00",
    "bad length form": b"\x0c\x80{}",
    "not json": der.utf8_string("kind=node"),
    "not utf-8": b"\x0c\x02\xff\xfe",
    "json array": der.utf8_string('[{"kind":"node","v":1}]'),
    "json string": der.utf8_string('"node"'),
    "unknown version": der.utf8_string('{"kind":"node","v":2}'),
    "unknown kind": der.utf8_string('{"kind":"robot","v":1}'),
    "bad scope": der.utf8_string('{"kind":"agent","scopes":["db"],"v":1}'),
    "scopes not a list": der.utf8_string('{"kind":"agent","scopes":7,"v":1}'),
    "tags a string": der.utf8_string('{"kind":"node","tags":"prod","v":1}'),
    "tags of numbers": der.utf8_string('{"kind":"node","tags":[1,2],"v":1}'),
    "node a number": der.utf8_string('{"kind":"node","node":5,"v":1}'),
    "principal a list": der.utf8_string('{"kind":"agent","principal":["a"],"v":1}'),
}


@pytest.mark.parametrize("raw", MALFORMED_CLAIMS.values(), ids=MALFORMED_CLAIMS.keys())
def test_claims_decode_refuses_malformed_claims(raw: bytes) -> None:
    with pytest.raises(InvalidCertificate, match="malformed idmesh claims extension"):
        Claims.decode(raw)


@pytest.mark.parametrize("raw", MALFORMED_CLAIMS.values(), ids=MALFORMED_CLAIMS.keys())
def test_verify_leaf_refuses_malformed_claims(ca: CertificateAuthority, raw: bytes) -> None:
    cert = _custom_leaf(ca, claims=x509.UnrecognizedExtension(CLAIMS_OID, raw))
    with pytest.raises(InvalidCertificate, match="malformed idmesh claims extension"):
        verify_leaf(cert, ca.cert, NOW)


def test_build_leaf_refuses_an_id_outside_the_ca_trust_domain(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidInput, match="outside the trust domain"):
        build_leaf(ca, new_key(), SpiffeId("other.mesh", "node", "web-1"), NODE_CLAIMS, NOW, TTL)


def test_build_leaf_refuses_claims_of_another_kind(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidInput, match="claims of kind node"):
        build_leaf(ca, new_key(), AGENT_ID, NODE_CLAIMS, NOW, TTL)


# ---------------------------------------------------------------------------
# Claims encoding


@settings(max_examples=300, deadline=None)
@given(claims=claims_strategy())
def test_claims_round_trip_through_their_encoding(claims: Claims) -> None:
    raw = claims.encode()
    assert raw[0] == 0x0C
    assert Claims.decode(raw) == claims
    assert Claims.decode(raw).encode() == raw


def test_claims_encoding_is_canonical_json() -> None:
    assert NODE_CLAIMS.encode() == der.utf8_string(
        '{"addresses":["100.64.0.65","fd12:3456:789a:1::1"],'
        '"blocks":["100.64.0.64/26","fd12:3456:789a:1::/64"],'
        '"kind":"node","node":"web-1","owner":"ops@acme.com","tags":["prod","web"],"v":1}'
    )
    assert Claims(kind="admin").encode() == der.utf8_string('{"kind":"admin","v":1}')


def test_equal_scope_sets_encode_equally() -> None:
    a = Claims(kind="agent", scopes=parse_scopes(["web:*", "db:read", "db:read"]))
    b = Claims(kind="agent", scopes=parse_scopes(["db:read", "web:*"]))
    assert a.encode() == b.encode()


# ---------------------------------------------------------------------------
# SPIFFE IDs


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("spiffe://acme.mesh/node/web-1", SpiffeId("acme.mesh", "node", "web-1")),
        ("spiffe://acme.mesh/agent/a_B.9-x", SpiffeId("acme.mesh", "agent", "a_B.9-x")),
        ("spiffe://a/admin/root", SpiffeId("a", "admin", "root")),
        (
            "spiffe://my-corp.example.org/controller/controller",
            SpiffeId("my-corp.example.org", "controller", "controller"),
        ),
    ],
)
def test_spiffe_id_parses_and_prints_back(uri: str, expected: SpiffeId) -> None:
    assert SpiffeId.parse(uri) == expected
    assert str(expected) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "acme.mesh/node/web-1",
        "https://acme.mesh/node/web-1",
        "SPIFFE://acme.mesh/node/web-1",
        "spiffe://acme.mesh/node",
        "spiffe://acme.mesh/node/",
        "spiffe://acme.mesh//web-1",
        "spiffe:///node/web-1",
        "spiffe://acme.mesh/node/web-1/extra",
        "spiffe://acme.mesh/pod/web-1",
        "spiffe://Acme.Mesh/node/web-1",
        "spiffe://acme.mesh:443/node/web-1",
        "spiffe://user@acme.mesh/node/web-1",
        "spiffe://.acme.mesh/node/web-1",
        "spiffe://acme.mesh./node/web-1",
        "spiffe://acme.mesh/node/..",
        "spiffe://acme.mesh/node/.",
        "spiffe://acme.mesh/node/web 1",
        "spiffe://acme.mesh/node/web-1?x=1",
        "spiffe://acme.mesh/node/web-1#f",
        "spiffe://acme.mesh/node/web%2f1",
        "spiffe://acme.mesh/node/web-1\n",
        "spiffe://acme.mesh\n/node/web-1",
        "spiffe://acme.mesh/node/" + "x" * 129,
        "spiffe://" + "a" * 256 + "/node/web-1",
    ],
)
def test_spiffe_id_parse_refuses_what_is_not_an_idmesh_id(uri: str) -> None:
    with pytest.raises(InvalidInput):
        SpiffeId.parse(uri)


@pytest.mark.parametrize(
    "domain, kind, name",
    [
        ("acme.mesh\n", "node", "web-1"),
        ("acme.mesh", "node", "web-1\n"),
        ("acme.mesh", "Node", "web-1"),
        ("", "node", "web-1"),
        ("acme.mesh", "node", ""),
        ("acme/mesh", "node", "web-1"),
        ("acme.mesh", "node", "a/b"),
    ],
)
def test_spiffe_id_refuses_invalid_parts(domain: str, kind: str, name: str) -> None:
    with pytest.raises(InvalidInput):
        SpiffeId(domain, kind, name)  # type: ignore[arg-type]


@given(
    domain=st.from_regex(r"[a-z0-9_-][a-z0-9._-]{0,60}[a-z0-9_-]|[a-z0-9_-]", fullmatch=True),
    kind=st.sampled_from(["node", "agent", "admin", "controller"]),
    name=_names,
)
def test_spiffe_id_round_trips_through_its_uri(domain: str, kind: str, name: str) -> None:
    sid = SpiffeId(domain, kind, name)  # type: ignore[arg-type]
    assert SpiffeId.parse(str(sid)) == sid


@pytest.mark.parametrize("name", ["web-1", "a", "0", "a" * 63, "db-primary-2"])
def test_node_names_are_dns_labels(name: str) -> None:
    assert NODE_NAME.match(name)


@pytest.mark.parametrize("name", ["", "-web", "web-", "Web", "web_1", "web.1", "a" * 64, "web\n"])
def test_node_names_refuse_what_is_not_a_dns_label(name: str) -> None:
    assert not NODE_NAME.match(name)


# ---------------------------------------------------------------------------
# CSRs: proof of possession


def test_csr_carries_the_key_it_was_signed_with() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    assert load_csr(build_csr(key)).public_bytes_raw() == key.public_key().public_bytes_raw()


def _csr_der(pem: str) -> bytes:
    return x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)


def _csr_pem(raw: bytes) -> str:
    return x509.load_der_x509_csr(raw).public_bytes(serialization.Encoding.PEM).decode()


def test_csr_with_a_broken_signature_is_refused() -> None:
    raw = bytearray(_csr_der(build_csr(ed25519.Ed25519PrivateKey.generate())))
    raw[-1] ^= 0x01
    with pytest.raises(InvalidInput, match="no proof of possession"):
        load_csr(_csr_pem(bytes(raw)))


def test_csr_naming_someone_elses_key_is_refused() -> None:
    mine = ed25519.Ed25519PrivateKey.generate()
    theirs = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    raw = _csr_der(build_csr(mine))
    swapped = raw.replace(mine.public_key().public_bytes_raw(), theirs)
    assert swapped != raw
    with pytest.raises(InvalidInput, match="no proof of possession"):
        load_csr(_csr_pem(swapped))


def test_a_csr_is_one_pem_block_and_nothing_else() -> None:
    first, second = (build_csr(ed25519.Ed25519PrivateKey.generate()) for _ in range(2))
    for bad in (first + second, "junk\n" + first, first + "trailing"):
        with pytest.raises(InvalidInput, match="exactly one PEM block"):
            load_csr(bad)
    assert load_csr("\n" + first.replace("\n", "\r\n") + "\n")  # line endings and outer blank lines are fine


def test_csr_with_a_non_ed25519_key_is_refused() -> None:
    with pytest.raises(InvalidInput, match="must carry an Ed25519 key"):
        load_csr(build_csr(ec.generate_private_key(ec.SECP256R1())))


@pytest.mark.parametrize(
    "pem", ["", "hello", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"]
)
def test_garbage_csr_is_refused(pem: str) -> None:
    with pytest.raises(InvalidInput, match="malformed certificate signing request"):
        load_csr(pem)


# ---------------------------------------------------------------------------
# PEM helpers and fingerprints


def test_fingerprint_is_sha256_of_der_in_lower_case_hex(ca: CertificateAuthority) -> None:
    fp = fingerprint(ca.cert)
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    assert fp == hashlib.sha256(to_der(ca.cert)).hexdigest() == ca.fingerprint


def test_load_certificate_round_trips_pem(ca: CertificateAuthority) -> None:
    assert load_certificate(cert_pem(ca.cert)) == ca.cert
    assert load_certificate(cert_pem(ca.cert).encode()) == ca.cert


def test_load_certificate_refuses_garbage_and_bad_versions(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidCertificate, match="malformed certificate"):
        load_certificate("not a certificate")
    raw = bytearray(to_der(ca.cert))
    version = raw.index(b"\xa0\x03\x02\x01\x02") + 4
    raw[version] = 0x07  # X.509 has versions 1 to 3 (encoded 0 to 2)
    body = base64.encodebytes(bytes(raw)).decode()
    with pytest.raises(InvalidCertificate, match="malformed certificate"):
        load_certificate(f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n")
