"""The per-host progress display: one line per host, redrawn in place on a terminal,
plain lines (one per event) otherwise.

The formatting is pure (:func:`format_row`, :func:`frame`, :func:`event_line`)
so tests check the text; :class:`LiveProgress` and :class:`PlainProgress`
only write it.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, TextIO

__all__ = [
    "LiveProgress",
    "NullProgress",
    "PlainProgress",
    "Progress",
    "Row",
    "event_line",
    "format_row",
    "frame",
    "make_progress",
]

State = Literal["waiting", "working", "ok", "failed"]
_LABEL: dict[str, str] = {"waiting": "", "working": "..", "ok": "ok", "failed": "FAILED"}
_CLEAR_LINE = "\r\x1b[2K"


@dataclass
class Row:
    name: str
    target: str
    state: State = "waiting"
    text: str = "waiting"
    started: float | None = None
    finished: float | None = None

    def elapsed(self, now: float) -> float | None:
        if self.started is None:
            return None
        return (self.finished or now) - self.started


def format_row(row: Row, name_width: int, target_width: int, now: float) -> str:
    """``db-1  root@10.0.0.5:22  ok      installed idmesh 0.1.0; enrolled as db-1  [12.5s]``."""
    elapsed = row.elapsed(now)
    timer = f"  [{elapsed:.1f}s]" if elapsed is not None and row.state != "waiting" else ""
    return (f"{row.name:<{name_width}}  {row.target:<{target_width}}  {_LABEL[row.state]:<6}  "
            f"{row.text}{timer}").rstrip()


def _widths(rows: Iterable[Row]) -> tuple[int, int]:
    rows = list(rows)
    return max((len(r.name) for r in rows), default=0), max((len(r.target) for r in rows), default=0)


def _fit(line: str, width: int) -> str:
    """Cut to the terminal's width: a wrapped line would break the cursor arithmetic of a redraw."""
    if width <= 1 or len(line) < width:
        return line
    return line[: width - 2] + "…"


def frame(rows: list[Row], now: float, width: int, drawn: int) -> str:
    """The whole table, drawn over the ``drawn`` lines of the previous frame."""
    nw, tw = _widths(rows)
    up = f"\x1b[{drawn}A" if drawn else ""
    return up + "".join(f"{_CLEAR_LINE}{_fit(format_row(r, nw, tw, now), width)}\n" for r in rows)


def event_line(row: Row) -> str:
    """One plain line for a change: ``db-1: enrolling`` / ``db-1: ok: ...`` / ``db-1: FAILED: ...``."""
    if row.state in ("ok", "failed"):
        return f"{row.name}: {_LABEL[row.state]}: {row.text}"
    return f"{row.name}: {row.text}"


class Progress(Protocol):
    def start(self, rows: list[Row]) -> None: ...

    def update(self, name: str, text: str) -> None: ...

    def done(self, name: str, ok: bool, text: str) -> None: ...

    def close(self) -> None: ...


class _Base:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.rows: dict[str, Row] = {}
        self.clock = clock

    def start(self, rows: list[Row]) -> None:
        self.rows = {r.name: r for r in rows}
        self._changed(None)

    def update(self, name: str, text: str) -> None:
        row = self.rows[name]
        if row.started is None:
            row.started = self.clock()
        row.state, row.text = "working", text
        self._changed(row)

    def done(self, name: str, ok: bool, text: str) -> None:
        row = self.rows[name]
        now = self.clock()
        row.started = row.started or now
        row.finished = now
        row.state, row.text = ("ok" if ok else "failed"), text
        self._changed(row)

    def close(self) -> None:
        pass

    def _changed(self, row: Row | None) -> None:
        pass


class NullProgress(_Base):
    """Shows nothing (``--json`` without a terminal)."""


class PlainProgress(_Base):
    """One line per event, for logs and pipes."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self.stream = stream

    def _changed(self, row: Row | None) -> None:
        if row is not None:
            self.stream.write(event_line(row) + "\n")
            self.stream.flush()


class LiveProgress(_Base):
    """The table redrawn in place; :meth:`tick` keeps the timers moving while hosts work."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic,
                 width: Callable[[], int] = lambda: shutil.get_terminal_size().columns) -> None:
        super().__init__(clock)
        self.stream = stream
        self.width = width
        self._drawn = 0

    def _changed(self, row: Row | None) -> None:
        self.redraw()

    def redraw(self) -> None:
        rows = list(self.rows.values())
        self.stream.write(frame(rows, self.clock(), self.width(), self._drawn))
        self.stream.flush()
        self._drawn = len(rows)

    async def tick(self, interval: float = 0.5) -> None:
        while any(r.state in ("waiting", "working") for r in self.rows.values()):
            await asyncio.sleep(interval)
            self.redraw()


def make_progress(stream: TextIO, *, quiet: bool = False) -> Progress:
    """Live on a terminal, plain lines otherwise, nothing when ``quiet``."""
    if quiet:
        return NullProgress()
    if stream.isatty():
        return LiveProgress(stream)
    return PlainProgress(stream)
