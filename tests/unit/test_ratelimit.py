"""Failed-attempt limiting: a sliding window per source, a wait the caller can
act on, and memory that stays bounded under a flood of sources."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from controller.ratelimit import FailureLimiter
from meshcore.errors import PermissionDenied, RateLimited

NOW = datetime(2031, 3, 4, 5, 6, 7, tzinfo=UTC)
WINDOW = timedelta(seconds=60)


def seconds(n: float) -> timedelta:
    return timedelta(seconds=n)


def announced_wait(limiter: FailureLimiter, source: str, now: datetime) -> int:
    with pytest.raises(RateLimited) as refused:
        limiter.check(source, now)
    match = re.search(r"try again in (\d+)s$", str(refused.value))
    assert match, str(refused.value)
    return int(match.group(1))


def test_failures_below_the_limit_are_allowed() -> None:
    limiter = FailureLimiter(limit=3, window=WINDOW)
    for i in range(2):
        limiter.check("198.51.100.7", NOW + seconds(i))
        limiter.record_failure("198.51.100.7", NOW + seconds(i))
    limiter.check("198.51.100.7", NOW + seconds(2))


def test_reaching_the_limit_refuses_with_the_seconds_to_wait() -> None:
    limiter = FailureLimiter(limit=3, window=WINDOW)
    for t in (0, 10, 20):
        limiter.record_failure("198.51.100.7", NOW + seconds(t))
    with pytest.raises(
        RateLimited, match=r"^too many failed enrollment attempts from 198\.51\.100\.7; try again in \d+s$"
    ):
        limiter.check("198.51.100.7", NOW + seconds(20))
    # The oldest failure (t=0) leaves the window at t=60: 40 s from t=20, rounded up.
    assert 40 <= announced_wait(limiter, "198.51.100.7", NOW + seconds(20)) <= 41
    assert 30 <= announced_wait(limiter, "198.51.100.7", NOW + seconds(29.5)) <= 31


def test_waiting_the_announced_time_is_enough() -> None:
    limiter = FailureLimiter(limit=2, window=WINDOW)
    limiter.record_failure("s", NOW + seconds(0.25))
    limiter.record_failure("s", NOW + seconds(1))
    wait = announced_wait(limiter, "s", NOW + seconds(1))
    assert wait == 60  # 59.25 s rounded up
    with pytest.raises(RateLimited):
        limiter.check("s", NOW + seconds(60.25) - timedelta(microseconds=1))
    limiter.check("s", NOW + seconds(1 + wait))


def test_the_window_slides() -> None:
    limiter = FailureLimiter(limit=3, window=WINDOW)
    for t in (0, 10, 20):
        limiter.record_failure("s", NOW + seconds(t))
    with pytest.raises(RateLimited):
        limiter.check("s", NOW + seconds(59))
    limiter.check("s", NOW + seconds(60))  # t=0 has left the window: one more attempt
    limiter.record_failure("s", NOW + seconds(60))
    with pytest.raises(RateLimited):
        limiter.check("s", NOW + seconds(65))  # t=10, 20 and 60 are inside again
    limiter.check("s", NOW + seconds(70))


def test_sources_are_limited_independently() -> None:
    limiter = FailureLimiter(limit=1, window=WINDOW)
    limiter.record_failure("a", NOW)
    with pytest.raises(RateLimited):
        limiter.check("a", NOW)
    limiter.check("b", NOW)


def test_checking_costs_nothing() -> None:
    limiter = FailureLimiter(limit=1, window=WINDOW)
    for i in range(100):
        limiter.check("honest", NOW + seconds(i))


def test_rate_limited_is_a_permission_error_answered_429() -> None:
    assert issubclass(RateLimited, PermissionDenied)
    assert RateLimited.status == 429


def test_memory_stays_bounded_under_a_flood_of_sources() -> None:
    limiter = FailureLimiter(limit=3, window=WINDOW, max_sources=100)
    for i in range(10_000):
        limiter.record_failure(f"10.0.{i // 256}.{i % 256}", NOW)
    assert len(limiter._failures) <= 100
    # The oldest sources were forgotten first; the newest are still limited at the limit of 1 failure each.
    limiter.check("10.0.0.0", NOW)


def test_memory_per_source_stays_bounded() -> None:
    limiter = FailureLimiter(limit=3, window=WINDOW)
    for i in range(10_000):
        limiter.record_failure("s", NOW + seconds(i / 1000))
    assert len(limiter._failures["s"]) == 3
    # The newest failures are kept: the wait counts from the third most recent one (t=9.997 s),
    # not from the first (t=0, which would announce 50 s).
    assert announced_wait(limiter, "s", NOW + seconds(10)) == 60


def test_expired_sources_are_forgotten_when_checked() -> None:
    limiter = FailureLimiter(limit=3, window=WINDOW)
    limiter.record_failure("s", NOW)
    limiter.check("s", NOW + WINDOW)
    assert "s" not in limiter._failures
