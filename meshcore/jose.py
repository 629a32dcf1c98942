"""What grants and assertions share: a compact JWS whose signer's certificate rides in ``x5c`` (pure).

Both are checked the same way before their signature is: the header names
the expected ``typ`` and ``alg``, its first ``x5c`` certificate is a leaf of
this mesh (:func:`meshcore.identity.verify_leaf`) of the expected kind, with
an Ed25519 key. JOSE itself is joserfc's; this reads only the header.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from .errors import InvalidCertificate, InvalidToken
from .identity import Identity, load_der_certificate, verify_leaf

__all__ = ["x5c_signer"]


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def x5c_signer(token: str, what: str, typ: str, alg: str, kind: str, ca: x509.Certificate,
               now: datetime) -> Identity:
    """The verified signer of ``token``, a ``what`` ("grant", "assertion"), or InvalidToken in one line."""
    article = "an" if what[0] in "aeiou" else "a"
    try:
        header = json.loads(_unb64(token.split(".", 1)[0]))
        signer_cert = load_der_certificate(base64.b64decode(header["x5c"][0], validate=True))
    except (ValueError, KeyError, TypeError, IndexError, InvalidCertificate) as exc:
        raise InvalidToken(f"not {article} {what}: its header carries no signer certificate") from exc
    if not isinstance(header, dict) or header.get("typ") != typ or header.get("alg") != alg:
        raise InvalidToken(f"not {article} {what}: its header must say typ {typ} and alg {alg}")
    try:
        signer = verify_leaf(signer_cert, ca, now)
    except InvalidCertificate as exc:
        raise InvalidToken(f"the {what}'s signer certificate is refused: {exc}") from exc
    if signer.spiffe_id.kind != kind or not isinstance(signer.public_key, ed25519.Ed25519PublicKey):
        signed_by = "a principal" if kind == "user" else f"a {kind}"
        raise InvalidToken(f"{article} {what} must be signed by {signed_by}'s Ed25519 key, not by {signer.spiffe_id}")
    return signer
