"""Every parser of outside input, fed random and mutated input (issue 18): an idmesh error or a result, nothing else.

A traceback here is a request that makes the controller or a node log one
at will. Mutations start from valid input (the seed policy, a real token, a
real certificate and grant), where the interesting bugs live; a mutated
certificate or grant that is still accepted must be the original.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from meshcore.errors import IdmeshError
from meshcore.grants import read_grant, sign_grant
from meshcore.identity import (
    Claims,
    SpiffeId,
    build_csr,
    build_leaf,
    load_certificate,
    load_csr,
    new_ca,
    verify_leaf,
)
from meshcore.policy import load_policy
from meshcore.tokens import new_token, parse_token
from meshcore.wire.local import AgentRunRequest
from meshcore.wire.stream import PeerNode, StreamMessage
from meshd.agents.book import AgentBook

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CA = new_ca("acme.mesh", ed25519.Ed25519PrivateKey.generate(), NOW - timedelta(days=1))
SEED = (Path(__file__).resolve().parents[2] / "examples" / "policy.yaml").read_text()
CSR_KEY = ed25519.Ed25519PrivateKey.generate()
CSR = build_csr(CSR_KEY)
TOKEN = new_token("https://ctl.acme.mesh:8443", "ab" * 32).encode()
AGENT = build_leaf(CA, ed25519.Ed25519PrivateKey.generate().public_key(), SpiffeId("acme.mesh", "agent", "a1"),
                   Claims(kind="agent", node="n1", principal="nikita@acme.com", addresses=("100.64.0.3", "fd00::3")),
                   NOW, timedelta(hours=1))
NODES = {"n1": PeerNode(name="n1", wireguard_public_key="k" * 43 + "=", addresses=("100.64.0.1", "fd00::1"),
                        blocks=("100.64.0.0/26", "fd00::/64"))}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mutate(data: st.DataObject, text: str, alphabet: str = "") -> str:
    """Up to four edits of ``text``: a character replaced, inserted or deleted, or a slice repeated."""
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, max(len(text) - 1, 0)))
        kind = data.draw(st.sampled_from(["replace", "insert", "delete", "repeat"]))
        char = data.draw(st.sampled_from(alphabet) if alphabet else st.characters(codec="utf-8"))
        if kind == "replace":
            text = text[:at] + char + text[at + 1:]
        elif kind == "insert":
            text = text[:at] + char + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + 1:]
        else:
            text = text[:at] + text[at:at + data.draw(st.integers(1, 40))] * 2 + text[at:]
    return text


@FUZZ
@given(st.data())
def test_a_mutated_seed_policy_is_a_policy_or_a_located_error(data: st.DataObject) -> None:
    text = mutate(data, SEED, alphabet=" \n\t:-[]{}#'\"*,&!|>%@abz0129")
    try:
        load_policy(text, "policy.yaml")
    except IdmeshError as exc:
        assert str(exc).startswith("policy.yaml"), str(exc)  # file, line and what is wrong


@FUZZ
@given(st.data())
def test_a_damaged_token_is_refused_in_one_line(data: st.DataObject) -> None:
    try:
        parse_token(mutate(data, TOKEN))
    except IdmeshError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(st.text(max_size=3000))
def test_any_text_as_a_csr_is_a_key_or_malformed(text: str) -> None:
    try:
        load_csr(text)
    except IdmeshError:
        pass


@FUZZ
@given(st.data())
def test_a_mutated_csr_is_refused_or_still_proves_the_same_key(data: st.DataObject) -> None:
    try:
        got = load_csr(mutate(data, CSR))
    except IdmeshError:
        return
    assert got == CSR_KEY.public_key()


def _der_mutant(data: st.DataObject, cert: x509.Certificate) -> tuple[bytes, str]:
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    for _ in range(data.draw(st.integers(1, 3))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    body = base64.encodebytes(bytes(der)).decode()
    return bytes(der), f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n"


@FUZZ
@given(st.data())
def test_a_bit_flipped_certificate_is_refused_unless_what_was_signed_is_unchanged(data: st.DataObject) -> None:
    _, pem = _der_mutant(data, AGENT)
    try:
        cert = load_certificate(pem)
        verify_leaf(cert, CA.cert, NOW)
    except (IdmeshError, ValueError):  # ValueError: cryptography parses some fields lazily
        return
    assert cert.tbs_certificate_bytes == AGENT.tbs_certificate_bytes


@FUZZ
@given(st.data())
def test_a_node_admits_only_agent_certificates_that_verify_and_never_raises(data: st.DataObject) -> None:
    _, pem = _der_mutant(data, AGENT)
    book = AgentBook(CA.cert)
    admitted = book.admit_all((pem, data.draw(st.text(max_size=200))), NODES, NOW)
    if admitted:
        assert load_certificate(pem).tbs_certificate_bytes == AGENT.tbs_certificate_bytes


def _grant() -> tuple[str, x509.Certificate]:
    key = ed25519.Ed25519PrivateKey.generate()
    cert = build_leaf(CA, key.public_key(), SpiffeId("acme.mesh", "user", "nikita@acme.com"),
                      Claims(kind="user", principal="nikita@acme.com", node="laptop"), NOW, timedelta(hours=12))
    return sign_grant(key, cert, principal="nikita@acme.com", trust_domain="acme.mesh", node="agents-1",
                      scopes=["db:write"], ttl=timedelta(minutes=30), now=NOW, uses=1), cert


GRANT = _grant()  # one for every example: Hypothesis replays draws against the same input


@FUZZ
@given(st.data())
def test_a_grant_whose_signer_certificate_is_damaged_is_refused(data: st.DataObject) -> None:
    line, cert = GRANT
    header, rest = line.split(".", 1)
    doc = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    doc["x5c"][0] = base64.b64encode(_der_mutant(data, cert)[0]).decode()
    mutant = base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=") + "." + rest
    try:
        read_grant(mutant, CA.cert, NOW)
    except IdmeshError:
        return
    raise AssertionError("a grant whose signer certificate was changed was accepted")


@FUZZ
@given(st.data())
def test_a_tampered_grant_is_refused(data: st.DataObject) -> None:
    line, _ = GRANT
    mutant = mutate(data, line, alphabet="ABCDEFabcdef0123456789-_.=")
    try:
        grant = read_grant(mutant, CA.cert, NOW)
    except IdmeshError:
        return
    assert grant == read_grant(line, CA.cert, NOW)  # base64 padding bits aside, the same grant


@FUZZ
@given(st.one_of(st.text(max_size=500), st.binary(max_size=500).map(lambda b: b.decode("latin-1")),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                              lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
                                  st.sampled_from(["type", "version", "full", "delta", "agents", "policy", "nat",
                                                   "probe", "certificates", "revoked", "nodes"]), kids, max_size=5),
                              max_leaves=20).map(json.dumps)))
def test_any_stream_line_is_a_message_or_a_validation_error(line: str) -> None:
    try:
        StreamMessage.model_validate_json(line)
    except ValidationError:
        pass


@FUZZ
@given(st.dictionaries(st.sampled_from(["principal", "scopes", "ttl_seconds", "name", "uid", "gid", "grant", "x"]),
                       st.none() | st.booleans() | st.integers() | st.text(max_size=30)
                       | st.lists(st.text(max_size=10), max_size=3), max_size=8))
def test_any_local_agent_request_is_a_request_or_a_validation_error(body: dict[str, object]) -> None:
    try:
        AgentRunRequest.model_validate(body)
    except ValidationError:
        pass


def _pem(der: bytes, label: str) -> str:
    body = "\n".join(base64.b64encode(der).decode()[i:i + 64] for i in range(0, len(base64.b64encode(der)), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def test_what_the_fuzzing_found_a_csr_of_an_unknown_key_type_or_version_is_bad_input_not_a_500() -> None:
    der = x509.load_pem_x509_csr(CSR.encode()).public_bytes(serialization.Encoding.DER)
    ed25519_oid = b"\x06\x03\x2b\x65\x70"
    at = der.index(ed25519_oid)
    unknown_key = der[:at] + b"\x06\x03\x2c\x65\x70" + der[at + len(ed25519_oid):]
    assert der[6] == 0  # CertificationRequestInfo's version INTEGER
    version_4 = der[:6] + b"\x04" + der[7:]
    for bad in (unknown_key, version_4):
        try:
            load_csr(_pem(bad, "CERTIFICATE REQUEST"))
            raise AssertionError("accepted")
        except IdmeshError as exc:  # before: UnsupportedAlgorithm and InvalidVersion, which the API answered with 500
            assert "certificate signing request" in str(exc)


def test_what_the_fuzzing_found_a_certificate_with_a_negative_serial_is_malformed_not_a_warning() -> None:
    # a serial whose first byte has its top bit clear (a random one may not: then its DER has a leading zero
    # and setting the bit made no negative number, which failed this test one run in a few hundred)
    serial = b"\x5a" + b"\x11" * 19
    cert = build_leaf(CA, ed25519.Ed25519PrivateKey.generate().public_key(), SpiffeId("acme.mesh", "agent", "a2"),
                      Claims(kind="agent", node="n1", principal="nikita@acme.com", addresses=("100.64.0.4", "fd00::4")),
                      NOW, timedelta(hours=1), serial=int.from_bytes(serial, "big"))
    der = cert.public_bytes(serialization.Encoding.DER)
    at = der.index(serial)
    negative = der[:at] + bytes([serial[0] | 0x80]) + der[at + 1:]
    try:
        load_certificate(_pem(negative, "CERTIFICATE"))
        raise AssertionError("accepted")
    except IdmeshError as exc:  # before: a CryptographyDeprecationWarning on stderr, and the certificate parsed
        assert "malformed certificate" in str(exc)
