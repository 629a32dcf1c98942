"""A grant proves who signed what: the principal certificate it carries, the signature, its claims and its time."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from meshcore.errors import InvalidInput, InvalidToken
from meshcore.grants import NodeTarget, read_grant, sign_grant
from meshcore.identity import CertificateAuthority, Claims, SpiffeId, build_leaf, new_ca, verify_leaf

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CA = new_ca("acme.mesh", ed25519.Ed25519PrivateKey.generate(), NOW)


def principal_cert(principal: str = "nikita@acme.com", ca: CertificateAuthority = CA, kind: str = "user",
                   ttl: timedelta = timedelta(hours=12)) -> tuple[ed25519.Ed25519PrivateKey, x509.Certificate]:
    key = ed25519.Ed25519PrivateKey.generate()
    name = principal if kind == "user" else "agents-1"
    cert = build_leaf(ca, key.public_key(), SpiffeId("acme.mesh", kind, name),  # type: ignore[arg-type]
                      Claims(kind=kind, principal=principal, node="laptop"), NOW, ttl)  # type: ignore[arg-type]
    return key, cert


def grant(key: ed25519.Ed25519PrivateKey | None = None, cert: x509.Certificate | None = None, **over: object) -> str:
    if key is None or cert is None:
        key, cert = principal_cert()
    args: dict[str, object] = {"principal": "nikita@acme.com", "trust_domain": "acme.mesh", "node": "agents-1",
                               "scopes": ["db:write"], "ttl": timedelta(minutes=30), "now": NOW, "uses": 1}
    args.update(over)
    return sign_grant(key, cert, **args)  # type: ignore[arg-type]


def test_a_principal_certificate_is_an_svid_whose_path_holds_the_principal() -> None:
    _, cert = principal_cert()
    ident = verify_leaf(cert, CA.cert, NOW)
    assert str(ident.spiffe_id) == "spiffe://acme.mesh/user/acme.com/nikita"
    assert ident.spiffe_id.kind == "user" and ident.spiffe_id.name == "nikita@acme.com"
    assert SpiffeId.parse("spiffe://acme.mesh/user/acme.com/nikita") == ident.spiffe_id


@pytest.mark.parametrize("principal", ["nikita+bot@acme.com", "no-at-sign", "a@b@c", "@acme.com", "..@acme.com"])
def test_a_principal_a_spiffe_path_cannot_hold_is_refused(principal: str) -> None:
    with pytest.raises(InvalidInput, match="cannot name a principal certificate"):
        SpiffeId("acme.mesh", "user", principal)


def test_a_grant_reads_back_as_signed() -> None:
    key, cert = principal_cert()
    line = grant(key, cert, node="tag:agents", scopes=["db:write", "web:*"], uses=3)
    assert "\n" not in line and line.count(".") == 2
    g = read_grant(line, CA.cert, NOW + timedelta(minutes=1))
    assert g.principal == "nikita@acme.com" and g.node == NodeTarget("tag", "agents") and g.uses == 3
    assert [str(s) for s in g.scopes] == ["db:write", "web:*"] and g.id.startswith("g")
    assert g.not_after == NOW + timedelta(minutes=30) and g.signer.serial == cert.serial_number
    assert g.node.matches("agents-7", {"agents"}) and not g.node.matches("agents", {"db"})


def _tamper(line: str, **claims: object) -> str:
    head, payload, sig = line.split(".")
    doc = json.loads(base64.urlsafe_b64decode(payload + "=="))
    doc.update(claims)
    body = base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
    return f"{head}.{body}.{sig}"


def test_every_way_a_grant_can_be_wrong_is_refused_with_what_is_wrong() -> None:
    stranger_ca = new_ca("acme.mesh", ed25519.Ed25519PrivateKey.generate(), NOW)
    cases = {
        "garbage": ("garbage", "not a grant"),
        "tampered scopes": (_tamper(grant(), scopes=["*:*"]), "signature does not verify"),
        "expired": (grant(ttl=timedelta(minutes=1)), "expired"),
        "foreign CA": (grant(*principal_cert(ca=stranger_ca)), "signer certificate is refused"),
        "signed by a node": (grant(*principal_cert(kind="node")), "must be signed by a principal"),
        "another's name": (grant(*principal_cert("li@acme.com")), "speaks for nikita@acme.com but is signed by"),
        "other mesh": (grant(trust_domain="other.mesh"), "but is signed by spiffe://acme.mesh"),
    }
    for name, (line, reason) in cases.items():
        with pytest.raises(InvalidToken, match=reason):
            read_grant(line, CA.cert, NOW + timedelta(minutes=2))
        assert name  # each case is its own refusal


def test_a_key_that_is_not_the_certificates_cannot_sign() -> None:
    _, cert = principal_cert()
    forged = grant(ed25519.Ed25519PrivateKey.generate(), cert)
    with pytest.raises(InvalidToken, match="signature does not verify"):
        read_grant(forged, CA.cert, NOW)


def test_a_grant_signed_with_an_expired_principal_certificate_is_refused() -> None:
    key, cert = principal_cert(ttl=timedelta(minutes=10))
    line = grant(key, cert, ttl=timedelta(hours=1))
    with pytest.raises(InvalidToken, match="signer certificate is refused: certificate expired"):
        read_grant(line, CA.cert, NOW + timedelta(minutes=20))


@pytest.mark.parametrize(("target", "kind", "name"), [("agents-1", "node", "agents-1"), ("tag:db", "tag", "db")])
def test_a_target_names_a_node_or_a_tag(target: str, kind: str, name: str) -> None:
    assert NodeTarget.parse(target) == NodeTarget(kind, name) and str(NodeTarget.parse(target)) == target


def test_zero_uses_is_not_a_grant() -> None:
    with pytest.raises(InvalidInput, match="at least 1"):
        grant(uses=0)
