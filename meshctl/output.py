"""How meshctl prints for people: aligned tables, UTC times, time left and time since."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from meshcore.durations import format_duration

__all__ = ["ago", "remaining", "table", "when"]


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    """Columns as wide as their widest cell, two spaces apart; the header alone when there are no rows."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def remaining(expires: datetime, now: datetime) -> str:
    """``15m`` left until ``expires``, or ``expired``."""
    return format_duration(expires - now) if expires > now else "expired"


def ago(iso_time: str | None) -> str:
    """``3s ago`` for an ISO time (at least ``1s``), ``never`` for none."""
    if not iso_time:
        return "never"
    seconds = int((datetime.now(UTC) - datetime.fromisoformat(iso_time)).total_seconds())
    return f"{format_duration(timedelta(seconds=max(seconds, 1)))} ago"
