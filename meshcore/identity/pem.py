"""Keys, CSRs and certificates in and out of PEM."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..errors import InvalidCertificate, InvalidInput
from .authority import _EMPTY_NAME, _sign_hash
from .svid import SigningKey


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
    # Exactly one PEM block and nothing else: a second CSR, or text around it, would otherwise be ignored.
    if csr.public_bytes(serialization.Encoding.PEM).decode().strip() != pem.replace("\r\n", "\n").strip():
        raise InvalidInput("malformed certificate signing request: expected exactly one PEM block and nothing else")
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
