"""SPIFFE IDs, the idmesh claims extension, and what a verified certificate says (:class:`Identity`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from .. import der
from ..errors import InvalidCertificate, InvalidInput
from ..scopes import Scope, parse_scopes

# 2.25 is the UUID arc (ITU-T X.667): our arc is UUID a3000e26-fd5a-4a2f-927d-42e5f8984389.
# Arc .1 holds the claims of an identity; further arcs are free for later use.
IDMESH_ARC = "2.25.216664450355754775089989304130184168329"
CLAIMS_OID = x509.ObjectIdentifier(IDMESH_ARC + ".1")

Kind = Literal["node", "agent", "admin", "controller", "user"]
_KINDS = ("node", "agent", "admin", "controller", "user")
SigningKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}\Z")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")
NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_USER = re.compile(r"^([A-Za-z0-9._-]{1,64})@([A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*)\Z")


def user_path(principal: str) -> str:
    """Where a principal sits in a SPIFFE ID: ``nikita@acme.com`` is ``user/acme.com/nikita``.

    A SPIFFE ID path allows only letters, digits, ``.``, ``-`` and ``_`` in a
    segment (SPIFFE-ID §2.2), so the ``@`` of an e-mail cannot appear in it:
    the domain and the local part become two segments. A principal whose
    local part needs other characters cannot hold a principal certificate.
    """
    m = _USER.match(principal)
    if not m or m.group(1) in (".", ".."):
        raise InvalidInput(f"principal {principal!r} cannot name a principal certificate: it must be "
                           "local@domain with letters, digits, '.', '-' and '_' only")
    return f"user/{m.group(2)}/{m.group(1)}"


@dataclass(frozen=True)
class SpiffeId:
    """``spiffe://<trust_domain>/<kind>/<name>``, the only URI SAN of a leaf.

    For a person (kind ``user``) ``name`` is the principal, and the path is
    :func:`user_path`'s: ``spiffe://acme.mesh/user/acme.com/nikita``.
    """

    trust_domain: str
    kind: Kind
    name: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.match(self.trust_domain) or self.trust_domain.strip(".") != self.trust_domain:
            raise InvalidInput(f"invalid trust domain {self.trust_domain!r}: use a DNS-like name such as acme.mesh")
        if self.kind not in _KINDS:
            raise InvalidInput(f"invalid identity kind {self.kind!r}")
        if self.kind == "user":
            user_path(self.name)
        elif not _NAME.match(self.name) or self.name in (".", ".."):
            raise InvalidInput(f"invalid {self.kind} name {self.name!r}")

    def __str__(self) -> str:
        path = user_path(self.name) if self.kind == "user" else f"{self.kind}/{self.name}"
        return f"spiffe://{self.trust_domain}/{path}"

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        user = re.match(r"^spiffe://([^/]+)/user/([^/]+)/([^/]+)\Z", uri)
        if user:
            return cls(user.group(1), "user", f"{user.group(3)}@{user.group(2)}")
        m = re.match(r"^spiffe://([^/]+)/([^/]+)/([^/]+)\Z", uri)
        if not m or m.group(2) not in _KINDS or m.group(2) == "user":
            raise InvalidInput(f"not an idmesh SPIFFE ID: {uri!r}")
        return cls(m.group(1), m.group(2), m.group(3))  # type: ignore[arg-type]


_TEXT_CLAIMS = ("node", "owner", "principal", "parent", "name", "grant", "grant_signer")


@dataclass(frozen=True)
class Claims:
    """What the mesh asserts about an identity, carried in :data:`CLAIMS_OID`.

    Empty fields are left out of the encoding. ``node`` is the node an agent
    runs on (for a node: itself); ``addresses`` are the identity's own overlay
    addresses; ``blocks`` are the prefixes a node may source agents from.
    """

    kind: Kind
    node: str | None = None
    owner: str | None = None
    tags: tuple[str, ...] = ()
    principal: str | None = None
    scopes: tuple[Scope, ...] = ()
    parent: str | None = None
    addresses: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()
    name: str | None = None  # an agent's name, what policy's ``agent:`` selector matches
    grant: str | None = None
    """The grant an agent was born from; None: the node's word under a delegation."""
    grant_signer: str | None = None
    """The serial (hex) of the principal certificate that signed :attr:`grant`."""

    @property
    def authorized(self) -> Literal["grant", "delegation"]:
        """How an agent was authorized: by its principal's own grant, or by a delegation (the node's word)."""
        return "grant" if self.grant else "delegation"

    def encode(self) -> bytes:
        """DER UTF8String holding canonical JSON (sorted keys, no spaces)."""
        doc: dict[str, object] = {"v": 1, "kind": self.kind}
        for key in _TEXT_CLAIMS:
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        for key in ("tags", "addresses", "blocks"):
            if getattr(self, key):
                doc[key] = list(getattr(self, key))
        if self.scopes:
            doc["scopes"] = [str(s) for s in self.scopes]
        return der.utf8_string(json.dumps(doc, sort_keys=True, separators=(",", ":")))

    @classmethod
    def decode(cls, raw: bytes) -> Claims:
        try:
            if raw[:1] != b"\x0c":
                raise ValueError("not a UTF8String")
            size, offset = der.read_length(raw, 1)
            if offset + size != len(raw):
                raise ValueError("trailing bytes")
            doc = json.loads(raw[offset:].decode())
            if not isinstance(doc, dict):
                raise TypeError("not a JSON object")
            if doc.get("v") != 1 or doc.get("kind") not in _KINDS:
                raise ValueError("unknown claims version or kind")
            for key in _TEXT_CLAIMS:
                if not isinstance(doc.get(key, ""), str):
                    raise TypeError(f"{key} is not a string")
            for key in ("tags", "scopes", "addresses", "blocks"):
                value = doc.get(key, [])
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise TypeError(f"{key} is not a list of strings")
            return cls(
                kind=doc["kind"],
                node=doc.get("node"),
                owner=doc.get("owner"),
                tags=tuple(doc.get("tags", ())),
                principal=doc.get("principal"),
                scopes=parse_scopes(doc.get("scopes", ())),
                parent=doc.get("parent"),
                addresses=tuple(doc.get("addresses", ())),
                blocks=tuple(doc.get("blocks", ())),
                name=doc.get("name"),
                grant=doc.get("grant"),
                grant_signer=doc.get("grant_signer"),
            )
        except (ValueError, KeyError, TypeError, InvalidInput) as exc:
            raise InvalidCertificate(f"malformed idmesh claims extension: {exc}") from exc


@dataclass(frozen=True)
class Identity:
    """A leaf certificate that :func:`verify_leaf` has checked."""

    spiffe_id: SpiffeId
    claims: Claims
    serial: int
    not_before: datetime
    not_after: datetime
    public_key: PublicKey = field(repr=False, compare=False)

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")
