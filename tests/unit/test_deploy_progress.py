"""The progress display: one line per host, redrawn in place on a terminal, plain lines otherwise."""

from __future__ import annotations

import asyncio
import io

from deploy.progress import LiveProgress, NullProgress, PlainProgress, Row, event_line, format_row, frame, make_progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def rows() -> list[Row]:
    return [Row("db-1", "root@10.0.0.5:22"), Row("laptop-7", "nikita@laptop.lan:22")]


def test_rows_are_aligned_and_timed() -> None:
    a = Row("db-1", "root@10.0.0.5:22", "working", "enrolling", started=90.0)
    b = Row("laptop-7", "nikita@laptop.lan:22", "failed", "connect: authentication failed", 90.0, 92.5)
    c = Row("x", "root@x:22")
    assert format_row(a, 8, 20, 100.0) == "db-1      root@10.0.0.5:22      ..      enrolling  [10.0s]"
    assert format_row(b, 8, 20, 100.0) == "laptop-7  nikita@laptop.lan:22  FAILED  connect: authentication failed  [2.5s]"
    assert format_row(c, 8, 20, 100.0) == "x         root@x:22                     waiting"


def test_a_frame_redraws_over_the_previous_one_and_fits_the_terminal() -> None:
    table = rows()
    first = frame(table, 100.0, 200, 0)
    assert first == ("\r\x1b[2Kdb-1      root@10.0.0.5:22              waiting\n"
                     "\r\x1b[2Klaptop-7  nikita@laptop.lan:22          waiting\n")
    table[0].state, table[0].text, table[0].started = "ok", "installed idmesh 0.1.0", 99.0
    second = frame(table, 100.0, 30, 2)
    assert second.startswith("\x1b[2A\r\x1b[2K")  # back up two lines, clear each
    lines = second.split("\x1b[2K")[1:]
    assert all(len(line.rstrip("\n\r")) <= 29 for line in lines)  # a wrapped line would break the redraw
    assert lines[0].rstrip("\n\r").endswith("…")


def test_plain_lines_name_the_host_and_the_outcome() -> None:
    assert event_line(Row("db-1", "t", "working", "enrolling")) == "db-1: enrolling"
    assert event_line(Row("db-1", "t", "ok", "unchanged: meshd running")) == "db-1: ok: unchanged: meshd running"
    assert event_line(Row("db-1", "t", "failed", "connect: unreachable")) == "db-1: FAILED: connect: unreachable"


def test_plain_progress_writes_one_line_per_event() -> None:
    out, clock = io.StringIO(), Clock()
    p = PlainProgress(out, clock)
    p.start(rows())
    p.update("db-1", "connecting")
    clock.now = 103.0
    p.done("laptop-7", False, "connect: authentication failed")
    p.done("db-1", True, "installed idmesh 0.1.0")
    assert out.getvalue().splitlines() == ["db-1: connecting", "laptop-7: FAILED: connect: authentication failed",
                                           "db-1: ok: installed idmesh 0.1.0"]
    assert p.rows["db-1"].elapsed(200.0) == 3.0 and p.rows["laptop-7"].elapsed(200.0) == 0.0


def test_live_progress_redraws_the_table_and_ticks_until_all_are_done() -> None:
    out, clock = Tty(), Clock()
    p = LiveProgress(out, clock, width=lambda: 120)
    p.start(rows())
    p.update("db-1", "uploading 27 wheels (16 MB) and installing")
    text = out.getvalue()
    assert text.count("\x1b[2A") == 1 and "db-1      root@10.0.0.5:22      ..      uploading 27 wheels" in text
    p.done("db-1", True, "installed")
    p.done("laptop-7", True, "unchanged")
    asyncio.run(p.tick(0.001))  # returns at once: nobody is working any more


def test_make_progress_picks_by_terminal() -> None:
    assert isinstance(make_progress(Tty()), LiveProgress)
    assert isinstance(make_progress(io.StringIO()), PlainProgress)
    assert isinstance(make_progress(Tty(), quiet=True), NullProgress)
