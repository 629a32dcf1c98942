"""Keys, CSRs and certificates in and out of PEM."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.utils import CryptographyDeprecationWarning

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
        with warnings.catch_warnings():
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            csr = x509.load_pem_x509_csr(pem.encode())
    except (ValueError, x509.InvalidVersion, CryptographyDeprecationWarning) as exc:
        raise InvalidInput(f"malformed certificate signing request: {exc}") from exc
    # Exactly one PEM block and nothing else: a second CSR, or text around it, would otherwise be ignored.
    if csr.public_bytes(serialization.Encoding.PEM).decode().strip() != pem.replace("\r\n", "\n").strip():
        raise InvalidInput("malformed certificate signing request: expected exactly one PEM block and nothing else")
    try:
        key = csr.public_key()
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise InvalidInput("certificate signing request must carry an Ed25519 key")
        if not csr.is_signature_valid:
            raise InvalidInput("certificate signing request signature does not verify (no proof of possession)")
    except (UnsupportedAlgorithm, ValueError) as exc:  # a key or signature type cryptography does not know
        raise InvalidInput(f"certificate signing request must carry an Ed25519 key ({exc})") from exc
    return key


def load_certificate(pem: bytes | str) -> x509.Certificate:
    """Parse one PEM certificate; what RFC 5280 disallows and cryptography only warns about (a serial that is not
    positive, say) is refused here too, not printed to stderr as a warning."""
    return _strictly(x509.load_pem_x509_certificate, pem.encode() if isinstance(pem, str) else pem)


def load_der_certificate(data: bytes) -> x509.Certificate:
    """The same for DER (a grant's ``x5c``)."""
    return _strictly(x509.load_der_x509_certificate, data)


def _strictly(load: Callable[[bytes], x509.Certificate], data: bytes) -> x509.Certificate:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            return load(data)
    except (ValueError, x509.InvalidVersion, CryptographyDeprecationWarning) as exc:
        raise InvalidCertificate(f"malformed certificate: {exc}") from exc


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: SigningKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
