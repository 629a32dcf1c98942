"""How a node reads the controller's clock from its HTTP Date header (meshd.node.session.clock_offset)."""

from __future__ import annotations

from datetime import UTC, datetime

from meshd.node.session import clock_offset

NOW = datetime(2026, 12, 2, 3, 0, 0, tzinfo=UTC)


def test_a_controller_ten_minutes_ahead_reads_as_plus_600_seconds() -> None:
    assert clock_offset("Wed, 02 Dec 2026 03:10:00 GMT", NOW) == 600.0
    assert clock_offset("Wed, 02 Dec 2026 02:59:58 GMT", NOW) == -2.0


def test_no_or_a_broken_date_is_no_offset() -> None:
    for date in (None, "", "yesterday", "Wed, 02 Dec 2026 03:10:00"):  # the last: no zone, so no instant
        assert clock_offset(date, NOW) is None
