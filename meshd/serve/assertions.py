"""Signing ``Idmesh-Assertion`` s, cached per caller and service (:mod:`meshcore.assertion`).

An assertion lives 60 s; one is signed per (caller, audience) and reused
while more than half its life is left, so a busy caller costs one Ed25519
signature every 30 s, not one per request. The node's certificate is
renewed in place (at two thirds of its life, so the old one is still
valid): each signing looks at the certificate file's change time, and a
renewal empties the cache and starts the new chain.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from meshcore.assertion import LIFETIME, sign_assertion

__all__ = ["Assertions"]

REUSE_FOR = LIFETIME.total_seconds() / 2
MAX_CACHED = 10_000


class Assertions:
    def __init__(self, key_file: Path, cert_file: Path, ca_file: Path) -> None:
        self._key_file, self._cert_file, self._ca_file = key_file, cert_file, ca_file
        self._key: ed25519.Ed25519PrivateKey | None = None
        self._chain: tuple[x509.Certificate, ...] = ()
        self._chain_stamp = -1
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}
        self.signed = 0

    def _current_chain(self) -> tuple[x509.Certificate, ...]:
        stamp = self._cert_file.stat().st_mtime_ns
        if stamp != self._chain_stamp:
            if self._key is None:
                key = serialization.load_pem_private_key(self._key_file.read_bytes(), None)
                assert isinstance(key, ed25519.Ed25519PrivateKey)
                self._key = key
            self._chain = (x509.load_pem_x509_certificate(self._cert_file.read_bytes()),
                           x509.load_pem_x509_certificate(self._ca_file.read_bytes()))
            self._chain_stamp = stamp
            self._cache.clear()
        return self._chain

    def get(self, caller: str, audience: str, claims: Mapping[str, Any]) -> str:
        """The assertion for ``caller`` (an actor key) to ``audience``, signed now or reused."""
        now = time.monotonic()
        cached = self._cache.get((caller, audience))
        if cached is not None and cached[1] > now:
            return cached[0]
        chain = self._current_chain()  # only when signing: a cached assertion's chain is still valid
        assert self._key is not None
        token = sign_assertion(self._key, chain, claims, audience, datetime.now(UTC))
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[(caller, audience)] = (token, now + REUSE_FOR)
        self.signed += 1
        return token
