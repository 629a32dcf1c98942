"""``Idmesh-Assertion``: who made a request, signed by the node that checked it (pure, no I/O).

meshd's ``serve`` (SPEC §9) forwards each allowed request to its upstream
with the caller's identity in headers. The headers are only as good as the
network between meshd and the upstream; the assertion lets an upstream
check them without trusting it, as Pomerium's and Cloudflare Access's
assertions do, but with no key server to ask: it is a JWT signed with the
receiving node's key, whose certificate chain to the mesh CA rides in the
``x5c`` header, so the mesh CA certificate is all an upstream needs
(:func:`verify_assertion`). Claims::

    iss            the node that checked the caller     spiffe://acme.mesh/node/db-1
    sub            the caller's SPIFFE ID                spiffe://acme.mesh/agent/a1b2... or .../node/laptop
    aud            the service (``serve --name``)        api
    iat, exp       seconds since the epoch: a 60 s life
    principal      the human (or the caller node's owner; absent for a tagged node)
    agent          the agent's id (agents only); agent_name its name
    scopes         the agent's scopes
    node           the node the caller runs on
    authorized_by  who authorized the agent: "nikita@acme.com (grant g...)", "node agents-1 (delegation)"

``alg`` is ``EdDSA`` (RFC 8037) rather than RFC 9864's ``Ed25519`` (which
grants use): an upstream verifies with whatever JOSE library it has, and
``EdDSA`` is what they accept today. JOSE is joserfc's.
"""

from __future__ import annotations

import base64
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from joserfc import jwt
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwa import JWSAlgModel
from joserfc.jwk import OKPKey
from joserfc.jws import JWSRegistry

from .errors import InvalidToken
from .identity import load_certificate
from .jose import x5c_signer

__all__ = ["ASSERTION_TYPE", "LIFETIME", "MAX_ASSERTION", "sign_assertion", "verify_assertion"]

ASSERTION_TYPE = "idmesh-assertion+jwt"
LIFETIME = timedelta(seconds=60)
MAX_ASSERTION = 16 * 1024
CLOCK_SKEW = timedelta(seconds=30)
_ALG = "EdDSA"


class _Registry(JWSRegistry):
    """Allows a header that carries a certificate chain (joserfc's default caps headers at 512 bytes), and
    ``EdDSA`` without joserfc's warning that RFC 9864 deprecates it (chosen knowingly: module docstring)."""

    max_header_length = 8192

    def get_alg(self, name: str) -> JWSAlgModel:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SecurityWarning)
            return super().get_alg(name)


_REGISTRY = _Registry(algorithms=[_ALG])


def _der64(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def sign_assertion(key: ed25519.Ed25519PrivateKey, chain: Sequence[x509.Certificate], claims: Mapping[str, Any],
                   audience: str, now: datetime) -> str:
    """A new assertion: ``claims`` (``sub``, ``principal``, ...) for ``audience``, valid :data:`LIFETIME`.

    ``chain`` is the node's certificate, then the CA's; ``iss`` is the node's SPIFFE ID, from its certificate.
    """
    issuer = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    body = {**claims, "iss": issuer.get_values_for_type(x509.UniformResourceIdentifier)[0], "aud": audience,
            "iat": int(now.timestamp()), "exp": int((now + LIFETIME).timestamp())}
    header = {"alg": _ALG, "typ": ASSERTION_TYPE, "x5c": [_der64(c) for c in chain]}
    return jwt.encode(header, body, OKPKey.import_key(key), algorithms=[_ALG], registry=_REGISTRY)


def verify_assertion(token: str, ca_pem: bytes | str, audience: str, now: datetime) -> dict[str, Any]:
    """The claims of ``token`` if a node of the mesh whose CA is ``ca_pem`` signed it for ``audience``,
    and it is in force at ``now``; else :class:`InvalidToken` with one line saying why."""
    token = token.strip()
    if len(token) > MAX_ASSERTION or token.count(".") != 2:
        raise InvalidToken("not an idmesh assertion (expected a JWT)")
    signer = x5c_signer(token, "assertion", ASSERTION_TYPE, _ALG, "node", load_certificate(ca_pem), now)
    try:
        assert isinstance(signer.public_key, ed25519.Ed25519PublicKey)  # x5c_signer checked it
        claims = dict(jwt.decode(token, OKPKey.import_key(signer.public_key), algorithms=[_ALG],
                                 registry=_REGISTRY).claims)
    except (JoseError, ValueError) as exc:
        raise InvalidToken("the assertion's signature does not verify (tampered, or signed by another key)") from exc
    if claims.get("iss") != str(signer.spiffe_id):
        raise InvalidToken(f"the assertion names issuer {claims.get('iss')!r} but is signed by {signer.spiffe_id}")
    if claims.get("aud") != audience:
        raise InvalidToken(f"the assertion is for {claims.get('aud')!r}, not {audience!r}")
    try:
        issued, expires = int(claims["iat"]), int(claims["exp"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidToken("the assertion has no iat or exp") from exc
    at = now.timestamp()
    if at > expires + CLOCK_SKEW.total_seconds():
        raise InvalidToken("the assertion has expired")
    if issued > at + CLOCK_SKEW.total_seconds():
        raise InvalidToken("the assertion is issued in the future")
    return claims
