"""Independent verifiers accept our leaves: OpenSSL's `verify` and `x509`, and
cryptography's WebPKI path validation (`cryptography.x509.verification`).

cryptography's WebPKI policy refuses Ed25519 keys outright, so the leaf
profile is proven there with the same builder code on an ECDSA P-256 CA and
leaf (new_ca and build_leaf accept EC keys and go through
build_leaf_reference); a separate test pins the reason Ed25519 is refused.
OpenSSL checks the Ed25519 leaves themselves. The clock is fixed: OpenSSL gets
it with ``-attime``.
"""

from __future__ import annotations

import base64
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshcore.identity import (
    CertificateAuthority,
    Claims,
    SpiffeId,
    build_leaf,
    cert_pem,
    fingerprint,
    new_ca,
    verify_leaf,
)
from meshcore.scopes import parse_scopes

NOW = datetime(2031, 3, 4, 5, 6, 7, tzinfo=UTC)
DOMAIN = "acme.mesh"
TTL = timedelta(hours=1)
CONTROLLER_HOST = "ctl.acme.mesh"

NODE_ID = SpiffeId(DOMAIN, "node", "web-1")
NODE_CLAIMS = Claims(kind="node", node="web-1", owner="ops@acme.com", tags=("prod",), addresses=("100.64.0.65",))
AGENT_ID = SpiffeId(DOMAIN, "agent", "a-0001")
AGENT_CLAIMS = Claims(kind="agent", node="web-1", principal="nikita@acme.com", scopes=parse_scopes(["db:read"]))
CONTROLLER_ID = SpiffeId(DOMAIN, "controller", "controller")


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run openssl; it must be installed (CI installs it), so a missing binary fails."""
    assert shutil.which("openssl"), "openssl is required for the interoperability tests"
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=30, check=False)


def attime(moment: datetime) -> str:
    return str(int(moment.timestamp()))


def write_pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_text(cert_pem(cert))
    return path


@dataclass
class Pki:
    ca: CertificateAuthority
    ca_file: Path
    node: Path
    agent: Path
    controller: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = new_ca(DOMAIN, ed25519.Ed25519PrivateKey.generate(), NOW)

    def leaf(sid: SpiffeId, claims: Claims, **names: tuple[object, ...]) -> x509.Certificate:
        return build_leaf(ca, ed25519.Ed25519PrivateKey.generate().public_key(), sid, claims, NOW, TTL, **names)  # type: ignore[arg-type]

    return Pki(
        ca=ca,
        ca_file=write_pem(tmp_path / "ca.crt", ca.cert),
        node=write_pem(tmp_path / "node.crt", leaf(NODE_ID, NODE_CLAIMS)),
        agent=write_pem(tmp_path / "agent.crt", leaf(AGENT_ID, AGENT_CLAIMS)),
        controller=write_pem(
            tmp_path / "controller.crt",
            leaf(
                CONTROLLER_ID,
                Claims(kind="controller"),
                dns_names=(CONTROLLER_HOST,),
                ip_addresses=(ipaddress.ip_address("127.0.0.1"),),
            ),
        ),
    )


# ---------------------------------------------------------------------------
# OpenSSL


@pytest.mark.parametrize(
    "options",
    [
        (),
        ("-x509_strict",),
        ("-purpose", "sslclient"),
        ("-purpose", "sslserver"),
        ("-x509_strict", "-purpose", "sslclient"),
    ],
    ids=["plain", "x509_strict", "sslclient", "sslserver", "strict_sslclient"],
)
@pytest.mark.parametrize("which", ["node", "agent", "controller"])
def test_openssl_verify_accepts_every_leaf_kind(pki: Pki, which: str, options: tuple[str, ...]) -> None:
    leaf = getattr(pki, which)
    result = openssl("verify", "-attime", attime(NOW), *options, "-CAfile", pki.ca_file, leaf)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{leaf}: OK"


def test_openssl_verify_refuses_a_leaf_of_a_foreign_ca_with_the_same_name(pki: Pki, tmp_path: Path) -> None:
    impostor = new_ca(DOMAIN, ed25519.Ed25519PrivateKey.generate(), NOW)
    assert impostor.cert.subject == pki.ca.cert.subject
    forged = build_leaf(impostor, ed25519.Ed25519PrivateKey.generate().public_key(), NODE_ID, NODE_CLAIMS, NOW, TTL)
    path = write_pem(tmp_path / "forged.crt", forged)
    result = openssl("verify", "-attime", attime(NOW), "-CAfile", pki.ca_file, path)
    assert result.returncode != 0
    # The authority key identifier already tells OpenSSL that our CA is not the issuer.
    assert "unable to get local issuer certificate" in result.stdout + result.stderr


def test_openssl_verify_refuses_a_leaf_whose_claims_were_edited(pki: Pki, tmp_path: Path) -> None:
    raw = x509.load_pem_x509_certificate(pki.agent.read_bytes()).public_bytes(serialization.Encoding.DER)
    edited = raw.replace(b"nikita@acme.com", b"attack@acme.com", 1)
    assert edited != raw and len(edited) == len(raw)
    path = tmp_path / "edited.crt"
    body = base64.encodebytes(edited).decode()
    path.write_text(f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n")
    result = openssl("verify", "-attime", attime(NOW), "-CAfile", pki.ca_file, path)
    assert result.returncode != 0
    assert "certificate signature failure" in result.stdout + result.stderr


def test_openssl_verify_refuses_an_expired_leaf(pki: Pki) -> None:
    later = NOW + TTL + timedelta(minutes=1)
    result = openssl("verify", "-attime", attime(later), "-CAfile", pki.ca_file, pki.agent)
    assert result.returncode != 0
    assert "certificate has expired" in result.stdout + result.stderr


def x509_ext_text(path: Path) -> str:
    result = openssl("x509", "-in", path, "-noout", "-ext", "subjectAltName,keyUsage,extendedKeyUsage,basicConstraints")
    assert result.returncode == 0, result.stderr
    return result.stdout


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines()]


@pytest.mark.parametrize("which, sid", [("node", NODE_ID), ("agent", AGENT_ID)])
def test_openssl_reads_the_x509_svid_extensions(pki: Pki, which: str, sid: SpiffeId) -> None:
    assert _lines(x509_ext_text(getattr(pki, which))) == [
        "X509v3 Basic Constraints: critical",
        "CA:FALSE",
        "X509v3 Key Usage: critical",
        "Digital Signature",
        "X509v3 Extended Key Usage:",
        "TLS Web Server Authentication, TLS Web Client Authentication",
        "X509v3 Subject Alternative Name: critical",
        f"URI:{sid}",
    ]


def test_openssl_reads_the_controller_host_names(pki: Pki) -> None:
    san = _lines(x509_ext_text(pki.controller))[-1]
    assert san == f"URI:{CONTROLLER_ID}, DNS:{CONTROLLER_HOST}, IP Address:127.0.0.1"


def test_openssl_sees_an_empty_subject_and_ed25519(pki: Pki) -> None:
    result = openssl("x509", "-in", pki.agent, "-noout", "-subject", "-text")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].rstrip() == "subject="
    assert "Signature Algorithm: ED25519" in result.stdout
    assert "Public Key Algorithm: ED25519" in result.stdout


def test_openssl_fingerprint_matches_ours(pki: Pki) -> None:
    result = openssl("x509", "-in", pki.ca_file, "-noout", "-fingerprint", "-sha256")
    assert result.returncode == 0, result.stderr
    theirs = result.stdout.strip().split("=", 1)[1].replace(":", "").lower()
    assert theirs == fingerprint(pki.ca.cert)


# ---------------------------------------------------------------------------
# cryptography.x509.verification (WebPKI), on the same profile with P-256 keys


@pytest.fixture(scope="module")
def ec_ca() -> CertificateAuthority:
    return new_ca(DOMAIN, ec.generate_private_key(ec.SECP256R1()), NOW)


def ec_leaf(ca: CertificateAuthority, sid: SpiffeId, claims: Claims, dns: tuple[str, ...] = ()) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return build_leaf(ca, key, sid, claims, NOW, TTL, dns_names=dns)


@pytest.mark.parametrize("sid, claims", [(NODE_ID, NODE_CLAIMS), (AGENT_ID, AGENT_CLAIMS)], ids=["node", "agent"])
def test_webpki_client_verifier_accepts_the_leaf_profile(
    ec_ca: CertificateAuthority, sid: SpiffeId, claims: Claims
) -> None:
    leaf = ec_leaf(ec_ca, sid, claims)
    verified = PolicyBuilder().store(Store([ec_ca.cert])).time(NOW).build_client_verifier().verify(leaf, [])
    assert verified.chain == [leaf, ec_ca.cert]
    assert verified.subjects == [x509.UniformResourceIdentifier(str(sid))]
    assert verify_leaf(leaf, ec_ca.cert, NOW).spiffe_id == sid  # and our own verifier agrees


def test_webpki_server_verifier_accepts_the_controller_leaf(ec_ca: CertificateAuthority) -> None:
    leaf = ec_leaf(ec_ca, CONTROLLER_ID, Claims(kind="controller"), dns=(CONTROLLER_HOST,))
    verifier = PolicyBuilder().store(Store([ec_ca.cert])).time(NOW).build_server_verifier(x509.DNSName(CONTROLLER_HOST))
    assert verifier.verify(leaf, []) == [leaf, ec_ca.cert]


def test_webpki_server_verifier_refuses_another_host_name(ec_ca: CertificateAuthority) -> None:
    leaf = ec_leaf(ec_ca, CONTROLLER_ID, Claims(kind="controller"), dns=(CONTROLLER_HOST,))
    verifier = PolicyBuilder().store(Store([ec_ca.cert])).time(NOW).build_server_verifier(x509.DNSName("evil.example"))
    with pytest.raises(VerificationError):
        verifier.verify(leaf, [])


def test_webpki_refuses_a_leaf_of_a_foreign_ca(ec_ca: CertificateAuthority) -> None:
    impostor = new_ca(DOMAIN, ec.generate_private_key(ec.SECP256R1()), NOW)
    leaf = ec_leaf(impostor, NODE_ID, NODE_CLAIMS)
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([ec_ca.cert])).time(NOW).build_client_verifier().verify(leaf, [])


def test_webpki_refuses_an_expired_leaf(ec_ca: CertificateAuthority) -> None:
    leaf = ec_leaf(ec_ca, NODE_ID, NODE_CLAIMS)
    later = NOW + TTL + timedelta(minutes=1)
    with pytest.raises(VerificationError, match="not valid at validation time"):
        PolicyBuilder().store(Store([ec_ca.cert])).time(later).build_client_verifier().verify(leaf, [])


def test_webpki_refuses_ed25519_only_because_of_its_key_algorithm_policy(pki: Pki) -> None:
    """If this fails because the leaf is accepted, cryptography now permits
    Ed25519: switch the WebPKI tests above to the real Ed25519 leaves."""
    leaf = x509.load_pem_x509_certificate(pki.node.read_bytes())
    verifier = PolicyBuilder().store(Store([pki.ca.cert])).time(NOW).build_client_verifier()
    with pytest.raises(VerificationError) as refused:
        verifier.verify(leaf, [])
    reason = str(refused.value)
    assert reason.startswith("validation failed: candidates exhausted: Forbidden public key algorithm: ")
    assert "Ed25519" in reason
