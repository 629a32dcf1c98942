"""Enrollment tokens: one line that tells a new node where the controller is,
which CA to trust, and proves it was invited.

Layout: ``idm1.`` followed by base64url (no padding) of compact JSON
``{"u": controller URL, "f": CA SHA-256 fingerprint (hex), "i": token id,
"s": secret}``, and ``"us": [every controller URL, "u" first]`` when the
mesh has several controller replicas (SPEC §8). ``"u"`` stays the first
URL, so a meshd that predates ``"us"`` still enrolls with the token (it
then learns the others from the netmap). The controller stores only the
SHA-256 of the whole token line, keyed by id, and compares in constant
time: changing any character — the URLs and the pinned fingerprint
included — makes the token worthless.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import InvalidToken

__all__ = ["EnrollmentToken", "hash_matches", "new_token", "parse_token", "token_hash"]

PREFIX = "idm1."
_ID = re.compile(r"^[A-Za-z0-9_-]{8,32}\Z")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{32,64}\Z")
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class EnrollmentToken:
    url: str
    ca_fingerprint: str
    id: str
    secret: str
    urls: tuple[str, ...] = ()
    """Every controller URL in the order to try, always ``url`` first (given without it: just ``(url,)``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "urls", tuple(dict.fromkeys((self.url, *self.urls))))

    def encode(self) -> str:
        doc: dict[str, object] = {"u": self.url, "f": self.ca_fingerprint, "i": self.id, "s": self.secret}
        if len(self.urls) > 1:  # a single-controller token stays what it always was
            doc["us"] = list(self.urls)
        raw = json.dumps(doc, separators=(",", ":")).encode()
        return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def __repr__(self) -> str:  # never print the secret
        more = f", urls={self.urls!r}" if len(self.urls) > 1 else ""
        return f"EnrollmentToken(url={self.url!r}{more}, id={self.id!r})"


def new_token(url: str, ca_fingerprint: str, urls: Sequence[str] = ()) -> EnrollmentToken:
    """A fresh token for ``url``; ``urls``: every controller replica's URL, ``url`` first (SPEC §8)."""
    return EnrollmentToken(url, ca_fingerprint, secrets.token_urlsafe(9), secrets.token_urlsafe(32), tuple(urls))


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise InvalidToken(f"enrollment token names no valid controller URL ({url!r})") from exc
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidToken(f"enrollment token names no https controller URL ({url!r})")


def _listed_urls(listed: object, url: str) -> tuple[str, ...]:
    """The ``"us"`` list, which only a controller writes: anything but distinct strings, ``url`` first, is damage."""
    if listed is None:
        return ()
    if (not isinstance(listed, list) or not listed or not all(isinstance(u, str) for u in listed)
            or listed[0] != url or len(set(listed)) != len(listed)):
        raise InvalidToken("enrollment token is damaged: its list of controller URLs is malformed")
    return tuple(listed)


def parse_token(text: str) -> EnrollmentToken:
    """Decode a token line; any defect is one :class:`InvalidToken` message."""
    text = text.strip()
    if not text.startswith(PREFIX) or len(text) > 2048:
        raise InvalidToken("not an idmesh enrollment token (it should start with 'idm1.')")
    body = text[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        doc = json.loads(raw)
        url, fingerprint, token_id, secret = doc["u"], doc["f"], doc["i"], doc["s"]
        listed = doc.get("us")
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidToken("enrollment token is damaged: it does not decode (was it copied whole?)") from exc
    if not all(isinstance(v, str) for v in (url, fingerprint, token_id, secret)):
        raise InvalidToken("enrollment token is damaged: fields have the wrong type")
    token = EnrollmentToken(url, fingerprint, token_id, secret, _listed_urls(listed, url))
    for each in token.urls:
        _check_url(each)
    if not _FINGERPRINT.match(token.ca_fingerprint):
        raise InvalidToken("enrollment token carries a malformed CA fingerprint")
    if not _ID.match(token.id) or not _SECRET.match(token.secret):
        raise InvalidToken("enrollment token is damaged: malformed id or secret")
    return token


def token_hash(line: str) -> bytes:
    return hashlib.sha256(line.strip().encode()).digest()


def hash_matches(line: str, stored: bytes) -> bool:
    return hmac.compare_digest(token_hash(line), stored)
