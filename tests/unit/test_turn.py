"""TURN REST API credentials: the username carries the expiry, the password is the HMAC coturn recomputes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from meshcore.errors import InvalidInput
from meshcore.turn import turn_credentials, turn_expiry

SECRET = b"s3cret-of-the-mesh"
NOW = datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)  # 1700000000


def test_known_vector() -> None:
    # Computed apart from this code: printf '%s' 1700003600:node-a | openssl dgst -sha1 -hmac s3cret-of-the-mesh -binary | base64
    assert turn_credentials(SECRET, "node-a", NOW, timedelta(hours=1)) == (
        "1700003600:node-a", "kZMyF+J/xSRnno3def5trae+73E=")


def test_expiry_is_a_whole_second_rounded_down_and_independent_of_the_zone() -> None:
    later = NOW.astimezone(timezone(timedelta(hours=-5))) + timedelta(microseconds=900_000)
    assert turn_credentials(SECRET, "node-a", later, timedelta(hours=1))[0] == "1700003600:node-a"
    assert turn_expiry("1700003600:node-a") == NOW + timedelta(hours=1)
    assert turn_expiry("node-a") is None and turn_expiry("x1:node-a") is None


def test_another_secret_or_name_gives_another_password() -> None:
    base = turn_credentials(SECRET, "node-a", NOW, timedelta(hours=1))[1]
    assert turn_credentials(SECRET + b"!", "node-a", NOW, timedelta(hours=1))[1] != base
    assert turn_credentials(SECRET, "node-b", NOW, timedelta(hours=1))[1] != base


@pytest.mark.parametrize(("secret", "name", "now", "ttl", "message"), [
    (b"", "a", NOW, timedelta(hours=1), "secret is empty"),
    (SECRET, "", NOW, timedelta(hours=1), "user name"),
    (SECRET, "a b", NOW, timedelta(hours=1), "user name"),
    (SECRET, "a\n", NOW, timedelta(hours=1), "user name"),
    (SECRET, "a", NOW.replace(tzinfo=None), timedelta(hours=1), "timezone-aware"),
    (SECRET, "a", NOW, timedelta(0), "must be positive"),
])
def test_meaningless_input_is_refused(secret: bytes, name: str, now: datetime, ttl: timedelta, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        turn_credentials(secret, name, now, ttl)
