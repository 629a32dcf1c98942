"""TURN REST API credentials (the scheme coturn's ``use-auth-secret`` checks), as a pure function.

The controller holds a secret shared with the TURN server and hands each
node a credential that expires on its own, so the TURN server needs no user
database and a node that leaves the mesh loses the relay when its credential
runs out::

    username = "<expiry, unix seconds>:<name>"
    password = base64(HMAC-SHA1(secret, username))

``secret`` is the bytes of the server's ``static-auth-secret`` exactly as
configured (no trailing newline). The expiry is a whole second, rounded
down. coturn checks it when an allocation is created; a live allocation
cannot change its username (441 Wrong Credentials), which is why
:mod:`meshd.nat.relay` re-allocates to move to a new credential.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from datetime import UTC, datetime, timedelta

from .errors import InvalidInput

__all__ = ["turn_credentials", "turn_expiry"]


def turn_credentials(secret: bytes, name: str, now: datetime, ttl: timedelta) -> tuple[str, str]:
    """``(username, password)`` for ``name``, valid from ``now`` for ``ttl``."""
    if not secret:
        raise InvalidInput("the TURN secret is empty")
    if not name or not name.isprintable() or any(c.isspace() for c in name):
        raise InvalidInput(f"TURN user name {name!r} must be printable, without spaces, and not empty")
    if now.tzinfo is None:
        raise InvalidInput("now must be timezone-aware (a naive time would be read in the local zone)")
    if ttl <= timedelta(0):
        raise InvalidInput(f"TURN credential lifetime {ttl} must be positive")
    username = f"{math.floor((now + ttl).timestamp())}:{name}"
    digest = hmac.new(secret, username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def turn_expiry(username: str) -> datetime | None:
    """When a REST API username expires (UTC); None if it does not start with ``<digits>:``."""
    stamp, sep, _ = username.partition(":")
    if not sep or not stamp.isdigit():
        return None
    return datetime.fromtimestamp(int(stamp), tz=UTC)
