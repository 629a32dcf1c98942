"""The controller's disk fills up, or another process locks its database (issue 18's fault injection).

A real controller on a small tmpfs of its own: with the disk full,
enrollment fails with one line, the single-use token is not spent and
nothing half-written is left; when space returns it works again without a
restart. A database another process holds locked makes calls wait, then
succeed once it is released.
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Controller, cli, running_controller


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    import os

    from tests.prerequisites import require

    require("a tmpfs of the test's own", [] if os.geteuid() == 0 else ["root, to mount it"])
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write until the disk refuses; the file that did it."""
    filler = disk / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_fails_enrollment_in_one_line_spends_nothing_and_passes(small_disk: Path, tmp_path: Path) -> None:
    with running_controller(small_disk / "ctl", tmp_path / "controller.log") as controller:
        token = controller.token()
        filler = fill(small_disk)
        # a policy big enough that its WAL frames cannot fit in what is left
        (tmp_path / "big.yaml").write_text("acls: []\n" + "".join(f"# {'x' * 200}\n" for _ in range(20_000)))
        applied = cli("meshctl", "policy", "apply", str(tmp_path / "big.yaml"), env=controller.env)
        enrolled = cli("meshd", "enroll", token, "--name", "n1", "--state", str(tmp_path / "n1"))
        for failed in (applied, enrolled):  # before: "internal error in the controller" (a 500) and a traceback
            assert failed.returncode == 6 and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
            assert "database or disk is full" in failed.stderr, failed.stderr
        assert not (tmp_path / "n1" / "node.json").exists()  # nothing half-written on the node either
        filler.unlink()  # space returns: no restart needed
        cli("meshd", "enroll", token, "--name", "n1", "--state", str(tmp_path / "n1"), check=True)  # not spent
        assert "n1" in cli("meshctl", "nodes", "list", env=controller.env, check=True).stdout
        assert "Traceback" not in controller.log.read_text()


def test_a_database_another_process_holds_locked_makes_calls_wait_not_fail(controller: Controller) -> None:
    holder: Any
    if controller.db is None:
        holder = sqlite3.connect(controller.data / "controller.db", isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")
    else:  # another replica (or a DBA) holding the tables a token's creation writes
        import psycopg

        holder = psycopg.connect(controller.db)
        holder.execute("LOCK TABLE tokens, audit IN ACCESS EXCLUSIVE MODE")
    released = threading.Timer(2.0, lambda: holder.execute("ROLLBACK"))
    released.start()
    t0 = time.monotonic()
    try:
        made = cli("meshctl", "token", "create", env=controller.env)
    finally:
        released.join()
        holder.close()
    assert made.returncode == 0, made.stderr
    assert time.monotonic() - t0 >= 1.5  # it waited for the lock rather than failing
