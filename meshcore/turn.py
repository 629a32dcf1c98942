"""TURN REST credentials (draft-uberti-behave-turn-rest, coturn's ``use-auth-secret``): pure.

The controller shares a secret with the TURN server and hands each node
short-lived credentials derived from it; the TURN server checks them with
the same secret and no database: the username is ``<expiry unix time>:<name>``
and the password ``base64(HMAC-SHA1(secret, username))``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime, timedelta

__all__ = ["turn_credentials"]


def turn_credentials(secret: bytes, name: str, now: datetime, ttl: timedelta) -> tuple[str, str]:
    """(username, password) for ``name``, valid until ``now + ttl``."""
    username = f"{int((now + ttl).timestamp())}:{name}"
    password = base64.b64encode(hmac.new(secret, username.encode(), hashlib.sha1).digest()).decode()
    return username, password
