"""The node's state directory (``--state`` / ``IDMESH_STATE``).

Layout (the directory 0700, keys 0600)::

    node.key    Ed25519 identity key, made here and never sent anywhere
    node.crt    the node's X509-SVID, issued by the mesh CA
    ca.crt      the mesh CA, pinned by the enrollment token's fingerprint
    wg.key      WireGuard private key (base64, as ``wg genkey`` writes it)
    node.json   what the controller said about this node (name, block, ...)
                and every controller replica's URL, kept up to date from the netmap

Files are written to a temporary name and renamed into place, keys created
with mode 0600 from the start, so a crash never leaves a half-written file
and a key is never readable by others, not even for a moment.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import BaseModel, ConfigDict, Field

from meshcore.errors import InvalidInput, NotFound, PermissionDenied
from meshd.files import write_private
from meshd.wg.model import generate_private_key

__all__ = ["NodeRecord", "StateDir", "write_private"]


class NodeRecord(BaseModel):
    """What the controller said about this node at enrollment (node.json), and where the controllers are now.

    An older meshd reads ``controller`` and ignores ``controllers``; a
    record it wrote has no ``controllers``, and :attr:`urls` is then just
    its ``controller``.
    """

    model_config = ConfigDict(frozen=True)
    name: str
    domain: str
    spiffe_id: str
    controller: str = Field(description="the first controller URL to try (the token's at enrollment)")
    controllers: tuple[str, ...] = Field(default=(), description="every controller replica's URL in the order to "
                                         "try, ``controller`` first (SPEC §8); empty: only ``controller``")
    ca_fingerprint: str
    owner: str | None
    tags: tuple[str, ...]
    addresses: tuple[str, str] = Field(description="the node's own overlay addresses, IPv4 then IPv6")
    blocks: tuple[str, str] = Field(description="its block (itself + its agents), IPv4 then IPv6")
    mesh_prefixes: tuple[str, str]
    wireguard_public_key: str
    enrolled_at: datetime

    @property
    def urls(self) -> tuple[str, ...]:
        return self.controllers or (self.controller,)

    def with_controllers(self, urls: Sequence[str]) -> NodeRecord:
        """This record naming ``urls`` (not empty); ``controller`` becomes their first, for an older meshd."""
        if not urls:
            raise ValueError("a node record names at least one controller")
        return self.model_copy(update={"controller": urls[0], "controllers": tuple(urls)})


@dataclass(frozen=True)
class StateDir:
    path: Path

    @property
    def node_key(self) -> Path:
        return self.path / "node.key"

    @property
    def node_cert(self) -> Path:
        return self.path / "node.crt"

    @property
    def ca_cert(self) -> Path:
        return self.path / "ca.crt"

    @property
    def wg_key(self) -> Path:
        return self.path / "wg.key"

    @property
    def record(self) -> Path:
        return self.path / "node.json"

    def route_key(self) -> str:
        """The private key of this node's route tunnels (:mod:`meshd.routes.routing`): made here on first
        use, 0600, never the mesh key (one key per interface role)."""
        path = self.path / "route.key"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            key = generate_private_key()
            write_private(path, key + "\n")
            return key

    def enrolled(self) -> bool:
        return self.node_cert.exists() and self.record.exists()

    def ensure(self) -> None:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not os.access(self.path, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as exc:
            raise PermissionDenied(f"cannot write to the state directory {self.path}: {exc.strerror or exc}") from exc

    def read_record(self) -> NodeRecord:
        try:
            return NodeRecord.model_validate_json(self.record.read_text())
        except FileNotFoundError as exc:
            raise NotFound(f"this node is not enrolled (no {self.record}); run 'meshd enroll TOKEN'") from exc
        except ValueError as exc:
            raise InvalidInput(f"{self.record} is damaged; enroll again with 'meshd enroll --force TOKEN'") from exc

    def write(self, node_key: ed25519.Ed25519PrivateKey, wg_private: str, cert_pem: str, ca_pem: str,
              record: NodeRecord) -> None:
        """Write every file of an enrollment; the record last, as the commit mark."""
        try:
            write_private(self.node_key, node_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode())
            write_private(self.wg_key, wg_private + "\n")
            write_private(self.ca_cert, ca_pem, 0o644)
            write_private(self.node_cert, cert_pem, 0o644)
        except OSError as exc:
            raise PermissionDenied(f"cannot write to the state directory {self.path}: {exc.strerror or exc}") from exc
        self.write_record(record)

    def write_record(self, record: NodeRecord) -> None:
        """Replace node.json whole (a crash leaves the old one or the new one)."""
        try:
            write_private(self.record, record.model_dump_json(indent=2) + "\n", 0o644)
        except OSError as exc:
            raise PermissionDenied(f"cannot write to the state directory {self.path}: {exc.strerror or exc}") from exc
