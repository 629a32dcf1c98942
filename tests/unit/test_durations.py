"""Durations as people write them, and back."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcore.durations import format_duration, parse_duration
from meshcore.errors import InvalidInput


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90s", 90),
        ("15m", 900),
        ("1h", 3600),
        ("1h30m", 5400),
        ("7d", 7 * 86400),
        ("1d2h3m4s", 86400 + 7200 + 180 + 4),
        ("30m1h", 5400),  # order does not matter
        ("1h1h", 7200),  # repeats add up
        ("  15m\n", 900),
        ("0h5m", 300),
        ("3650d", 3650 * 86400),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "use forms like 90s"),
        ("   ", "use forms like 90s"),
        ("15", "use forms like 90s"),
        ("m", "use forms like 90s"),
        ("1.5h", "use forms like 90s"),
        ("-5m", "use forms like 90s"),
        ("1h 30m", "use forms like 90s"),
        ("5M", "use forms like 90s"),
        ("1w", "use forms like 90s"),
        ("5 minutes", "use forms like 90s"),
        ("0s", "must be longer than zero"),
        ("0h0m", "must be longer than zero"),
        ("9" * 30 + "d", "too long"),
        ("1000000000d", "too long"),
    ],
)
def test_parse_duration_refuses_with_a_clear_message(text: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason) as refused:
        parse_duration(text)
    assert str(refused.value).startswith("invalid duration")


@pytest.mark.parametrize(
    "delta, text",
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=59), "59s"),
        (timedelta(minutes=15), "15m"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(days=7), "7d"),
        (timedelta(days=1, seconds=1), "1d1s"),
        (timedelta(seconds=90.9), "1m30s"),  # sub-second precision is dropped
    ],
)
def test_format_duration(delta: timedelta, text: str) -> None:
    assert format_duration(delta) == text


@given(st.integers(min_value=1, max_value=999_999 * 86400))
def test_format_then_parse_round_trips(seconds: int) -> None:
    delta = timedelta(seconds=seconds)
    text = format_duration(delta)
    assert parse_duration(text) == delta
    assert format_duration(parse_duration(text)) == text


@given(st.lists(st.tuples(st.integers(min_value=0, max_value=10_000), st.sampled_from("smhd")), min_size=1, max_size=5))
def test_parse_sums_its_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{u}" for n, u in parts)
    seconds = sum(n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts)
    if seconds == 0:
        with pytest.raises(InvalidInput):
            parse_duration(text)
    else:
        assert parse_duration(text).total_seconds() == seconds
