"""Grants: a principal's own signed approval for a node to start agents for them (pure, no I/O).

A grant is a compact JWS (RFC 7515) signed with the key of the principal's
certificate, which rides in the ``x5c`` header, so whoever holds the mesh CA
can check it without asking anyone: the certificate is a ``user`` X509-SVID
of this mesh (:func:`meshcore.identity.verify_leaf`), the signature is its
key's, and the claims are::

    iss     the principal's SPIFFE ID        spiffe://acme.mesh/user/acme.com/nikita
    sub     the principal                     nikita@acme.com
    aud     the mesh                          spiffe://acme.mesh
    jti     the grant's id                    g3f9c0a1b2d4e5f60
    node    where agents may be born          agents-1, or tag:agents
    scopes  what they may do, at most         ["db:write"]
    uses    how many agents it may start      1 (absent: until it expires)
    iat, exp                                  seconds since the epoch

The signature is fully specified (``alg: Ed25519``, RFC 9864); the header's
``typ`` is :data:`GRANT_TYPE`. Revocation, use counting and the policy's
delegations are the controller's to check (it holds the state); this module
only proves who signed what. JOSE is joserfc's, not hand-written.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey

from .errors import InvalidInput, InvalidToken
from .identity import Identity, SpiffeId
from .jose import x5c_signer
from .scopes import Scope, parse_scopes

__all__ = ["GRANT_TYPE", "MAX_GRANT", "Grant", "NodeTarget", "read_grant", "sign_grant"]

GRANT_TYPE = "idmesh-grant+jws"
MAX_GRANT = 16 * 1024
"""Longer than any grant this code makes (the certificate is most of it): refused unread."""
_ALG = "Ed25519"
CLOCK_SKEW = timedelta(seconds=30)


class _Registry(jws.JWSRegistry):
    """joserfc's registry, allowing a header that carries a certificate (its default caps headers at 512 bytes)."""

    max_header_length = 4096


_REGISTRY = _Registry(algorithms=[_ALG])


@dataclass(frozen=True)
class NodeTarget:
    """Where a grant lets agents be born: one node (``agents-1``) or every node of a tag (``tag:agents``)."""

    kind: str  # "node" or "tag"
    name: str

    @classmethod
    def parse(cls, text: str) -> NodeTarget:
        kind, _, name = text.rpartition(":")
        kind = kind or "node"
        if kind not in ("node", "tag") or not name:
            raise InvalidInput(f"grant target {text!r}: expected NODE or tag:TAG")
        return cls(kind, name)

    def matches(self, node: str, tags: frozenset[str] | set[str] | tuple[str, ...]) -> bool:
        return node == self.name if self.kind == "node" else self.name in tags

    def __str__(self) -> str:
        return self.name if self.kind == "node" else f"tag:{self.name}"


@dataclass(frozen=True)
class Grant:
    """A grant whose signature and signer :func:`read_grant` checked."""

    id: str
    principal: str
    node: NodeTarget
    scopes: tuple[Scope, ...]
    issued_at: datetime
    not_after: datetime
    uses: int | None
    signer: Identity
    """The principal certificate that signed it (its serial is what the controller checks for revocation)."""


def sign_grant(key: ed25519.Ed25519PrivateKey, certificate: x509.Certificate, principal: str, trust_domain: str,
               node: str, scopes: list[str], ttl: timedelta, now: datetime, uses: int | None = None) -> str:
    """A new grant, one line, signed with the principal's key (whose certificate it carries)."""
    target = NodeTarget.parse(node)
    if uses is not None and uses < 1:
        raise InvalidInput("a grant's --uses must be at least 1")
    claims: dict[str, object] = {
        "iss": str(SpiffeId(trust_domain, "user", principal)), "sub": principal, "aud": f"spiffe://{trust_domain}",
        "jti": "g" + secrets.token_hex(8), "node": str(target), "scopes": [str(s) for s in parse_scopes(scopes)],
        "iat": int(now.timestamp()), "exp": int((now + ttl).timestamp()),
    }
    if uses is not None:
        claims["uses"] = uses
    header = {"alg": _ALG, "typ": GRANT_TYPE,
              "x5c": [base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()]}
    payload = json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()
    return str(jws.serialize_compact(header, payload, OKPKey.import_key(key), registry=_REGISTRY))


def read_grant(text: str, ca_cert: x509.Certificate, now: datetime) -> Grant:
    """The grant in ``text`` if a principal certificate of this mesh signed it and it is in force at ``now``.

    Every refusal is one line saying what is wrong (:class:`InvalidToken`).
    """
    text = text.strip()
    if len(text) > MAX_GRANT or text.count(".") != 2:
        raise InvalidToken("not a grant (expected the one line printed by 'meshctl grant create')")
    signer = x5c_signer(text, "grant", GRANT_TYPE, _ALG, "user", ca_cert, now)
    public = signer.public_key
    assert isinstance(public, ed25519.Ed25519PublicKey)
    try:
        signed = jws.deserialize_compact(text, OKPKey.import_key(public), registry=_REGISTRY)
        claims = json.loads(signed.payload)
    except (JoseError, ValueError) as exc:
        raise InvalidToken("the grant's signature does not verify (tampered, or signed by another key)") from exc
    try:
        grant = Grant(
            id=str(claims["jti"]), principal=str(claims["sub"]), node=NodeTarget.parse(str(claims["node"])),
            scopes=parse_scopes(list(claims["scopes"])),
            issued_at=datetime.fromtimestamp(int(claims["iat"]), UTC),
            not_after=datetime.fromtimestamp(int(claims["exp"]), UTC),
            uses=None if claims.get("uses") is None else int(claims["uses"]), signer=signer)
    except (KeyError, TypeError, ValueError, InvalidInput) as exc:
        raise InvalidToken(f"the grant's claims are malformed: {exc}") from exc
    domain = signer.spiffe_id.trust_domain
    if grant.principal != signer.spiffe_id.name or claims.get("iss") != str(signer.spiffe_id):
        raise InvalidToken(f"the grant speaks for {grant.principal} but is signed by {signer.spiffe_id}")
    if claims.get("aud") != f"spiffe://{domain}":
        raise InvalidToken(f"the grant is for {claims.get('aud')!r}, not this mesh (spiffe://{domain})")
    if now > grant.not_after:
        raise InvalidToken(f"grant {grant.id} expired at {grant.not_after.isoformat(timespec='seconds')}")
    if grant.issued_at > now + CLOCK_SKEW:
        raise InvalidToken(f"grant {grant.id} is issued in the future ({grant.issued_at.isoformat()})")
    return grant
