"""The DER helpers the leaf fast path is assembled from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from meshcore import der


@pytest.mark.parametrize(
    "n, encoded",
    [
        (0, "00"),
        (1, "01"),
        (127, "7f"),
        (128, "8180"),
        (255, "81ff"),
        (256, "820100"),
        (65535, "82ffff"),
        (65536, "83010000"),
        (2**24, "8401000000"),
    ],
)
def test_length_uses_the_short_form_below_128_and_the_shortest_long_form_above(n: int, encoded: str) -> None:
    assert der.length(n).hex() == encoded
    assert der.read_length(bytes.fromhex(encoded), 0) == (n, len(encoded) // 2)


@given(st.integers(min_value=0, max_value=2**32 - 1), st.binary(max_size=4))
def test_read_length_inverts_length(n: int, before: bytes) -> None:
    raw = before + der.length(n) + b"rest"
    assert der.read_length(raw, len(before)) == (n, len(before) + len(der.length(n)))


@pytest.mark.parametrize(
    "raw, offset",
    [
        (b"\x80", 0),  # indefinite length: not DER
        (b"\x85\x01\x02\x03\x04\x05", 0),  # more than 4 length octets
        (b"\x82\x01", 0),  # truncated
        (b"\x0c", 1),  # nothing where the length should be
        (b"", 0),
    ],
)
def test_read_length_refuses_bad_lengths_with_value_error(raw: bytes, offset: int) -> None:
    with pytest.raises(ValueError):
        der.read_length(raw, offset)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 255, 256, 70_000])
def test_tlv_prefixes_tag_and_length(size: int) -> None:
    content = b"x" * size
    encoded = der.tlv(0x04, content)
    assert encoded[0] == 0x04
    assert der.read_length(encoded, 1) == (size, len(encoded) - size)
    assert encoded.endswith(content)
    assert der.octet_string(content) == encoded
    assert der.sequence(content) == b"\x30" + encoded[1:]


def test_empty_sequence_is_the_empty_name() -> None:
    assert der.sequence() == b"\x30\x00" == x509.Name([]).public_bytes()


def test_utf8_string_length_counts_bytes_not_characters() -> None:
    encoded = der.utf8_string("é" * 100)
    assert encoded[:3] == b"\x0c\x81\xc8"
    assert encoded[3:].decode() == "é" * 100


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, "020100"),
        (1, "020101"),
        (127, "02017f"),
        (128, "02020080"),
        (255, "020200ff"),
        (256, "02020100"),
        (0x8000, "0203008000"),
    ],
)
def test_integer_is_minimal_and_positive(value: int, encoded: str) -> None:
    assert der.integer(value).hex() == encoded


@given(st.integers(min_value=0, max_value=2**1024))
def test_integer_decodes_back_and_is_minimal(value: int) -> None:
    encoded = der.integer(value)
    size, start = der.read_length(encoded, 1)
    content = encoded[start:]
    assert encoded[0] == 0x02 and size == len(content)
    assert int.from_bytes(content, "big", signed=True) == value
    if len(content) > 1:  # no redundant leading byte
        assert not (content[0] == 0x00 and content[1] < 0x80)


def test_integer_refuses_negative_values() -> None:
    with pytest.raises(ValueError):
        der.integer(-1)


@pytest.mark.parametrize(
    "moment, encoded",
    [
        (datetime(1950, 1, 1, tzinfo=UTC), b"\x17\x0d500101000000Z"),
        (datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC), b"\x17\x0d991231235959Z"),
        (datetime(2000, 1, 1, tzinfo=UTC), b"\x17\x0d000101000000Z"),
        (datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC), b"\x17\x0d491231235959Z"),
        (datetime(2050, 1, 1, tzinfo=UTC), b"\x18\x0f20500101000000Z"),
        (datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC), b"\x18\x0f99991231235959Z"),
        (datetime(1949, 12, 31, 23, 59, 59, tzinfo=UTC), b"\x18\x0f19491231235959Z"),
        (datetime(2031, 3, 4, 5, 6, 7, 999_999, tzinfo=UTC), b"\x17\x0d310304050607Z"),  # no fractions
        (datetime(2031, 3, 4, 5, 6, 7), b"\x17\x0d310304050607Z"),  # naive is taken as UTC
    ],
    ids=str,
)
def test_time_is_utctime_until_2049_and_generalizedtime_after(moment: datetime, encoded: bytes) -> None:
    assert der.time(moment) == encoded


@pytest.mark.parametrize("hours", [-11, -3.5, 2, 5.75, 14])
def test_time_is_written_in_utc_for_any_time_zone(hours: float) -> None:
    moment = datetime(2049, 12, 31, 23, 30, tzinfo=UTC)
    local = moment.astimezone(timezone(timedelta(hours=hours)))
    assert der.time(local) == der.time(moment) == b"\x17\x0d491231233000Z"
