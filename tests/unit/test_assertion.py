"""Idmesh-Assertion: a node signs who called, an upstream checks it with the mesh CA alone."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from meshcore.assertion import sign_assertion, verify_assertion
from meshcore.errors import InvalidToken
from meshcore.identity import CertificateAuthority, Claims, SpiffeId, build_leaf, cert_pem, new_ca

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CA = new_ca("acme.mesh", ed25519.Ed25519PrivateKey.generate(), NOW)
CA_PEM = cert_pem(CA.cert)
CLAIMS = {"sub": "spiffe://acme.mesh/agent/a1", "principal": "nikita@acme.com", "agent": "a1", "scopes": ["db:read"],
          "node": "laptop"}


def leaf(kind: str = "node", ca: CertificateAuthority = CA) -> tuple[ed25519.Ed25519PrivateKey, x509.Certificate]:
    key = ed25519.Ed25519PrivateKey.generate()
    name = "nikita@acme.com" if kind == "user" else "db-1"
    cert = build_leaf(ca, key.public_key(), SpiffeId("acme.mesh", kind, name),  # type: ignore[arg-type]
                      Claims(kind=kind, node="db-1", principal="nikita@acme.com" if kind == "user" else None),  # type: ignore[arg-type]
                      NOW, timedelta(hours=1))
    return key, cert


def signed(kind: str = "node", ca: CertificateAuthority = CA, audience: str = "api", at: datetime = NOW) -> str:
    key, cert = leaf(kind, ca)
    return sign_assertion(key, [cert, ca.cert], CLAIMS, audience, at)


def test_an_assertion_verifies_with_the_mesh_ca_alone_and_carries_who_called() -> None:
    claims = verify_assertion(signed(), CA_PEM, "api", NOW + timedelta(seconds=10))
    assert claims["iss"] == "spiffe://acme.mesh/node/db-1" and claims["aud"] == "api"
    assert {k: claims[k] for k in CLAIMS} == CLAIMS and claims["exp"] - claims["iat"] == 60


def test_another_jose_library_verifies_it_too() -> None:
    """EdDSA, not RFC 9864's Ed25519: what upstreams' libraries accept (PyJWT here)."""
    token = signed()
    header = pyjwt.get_unverified_header(token)
    cert = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
    claims = pyjwt.decode(token, cert.public_key(), algorithms=["EdDSA"], audience="api",  # type: ignore[arg-type]
                          options={"verify_exp": False})
    assert claims["principal"] == "nikita@acme.com"


@pytest.mark.parametrize(("token", "audience", "at", "message"), [
    (lambda: signed(), "other", NOW, "is for 'api', not 'other'"),
    (lambda: signed(), "api", NOW + timedelta(minutes=2), "expired"),
    (lambda: signed(at=NOW + timedelta(minutes=5)), "api", NOW, "issued in the future"),
    (lambda: signed(ca=new_ca("acme.mesh", ed25519.Ed25519PrivateKey.generate(), NOW)), "api", NOW,
     "signer certificate is refused"),
    (lambda: signed(kind="user"), "api", NOW, "signed by a node"),
    (lambda: "a.b", "api", NOW, "expected a JWT"),
    (lambda: "e30.e30.sig", "api", NOW, "carries no signer certificate"),
])
def test_a_wrong_assertion_is_refused_in_one_line(token: object, audience: str, at: datetime, message: str) -> None:
    with pytest.raises(InvalidToken, match=message) as refused:
        verify_assertion(token(), CA_PEM, audience, at)  # type: ignore[operator]
    assert "\n" not in str(refused.value)


def test_a_tampered_claim_breaks_the_signature() -> None:
    head, body, sig = signed().split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["scopes"] = ["db:write"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidToken, match="does not verify"):
        verify_assertion(f"{head}.{forged}.{sig}", CA_PEM, "api", NOW)
