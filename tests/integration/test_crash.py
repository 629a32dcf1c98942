"""``kill -9`` during a burst of enrollments loses nothing and double-books nothing."""

from __future__ import annotations

import ipaddress
import signal
import threading
import time
from pathlib import Path

import pytest

from meshcore.errors import IdmeshError
from meshd.node.enroll import enroll
from meshd.node.state import StateDir

from .conftest import Controller, cli


# A request cut off by the kill can leave httpcore's half-open TLS socket to the garbage collector (seen once in
# CI as an "unclosed SSLSocket" ResourceWarning at the retry). That is the client library's hygiene under a dead
# server, not what this test is about (nothing lost, nothing booked twice), so it is not turned into a failure here.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_kill_9_during_an_enrollment_burst(controller: Controller, tmp_path: Path) -> None:
    token = controller.token("--tag", "burst", "--reusable", "--ttl", "1h")
    certified: dict[str, list[str]] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            name = f"w{w}-{i}"
            i += 1
            try:
                done = enroll(token, StateDir(tmp_path / "nodes" / name), name)
            except IdmeshError:
                continue  # the controller is gone or restarting
            with lock:
                certified[name] = done.response.node.blocks

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while len(certified) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        controller.stop(signal.SIGKILL)  # in the middle of the burst
        before_restart = dict(certified)
        controller.start()
        deadline = time.monotonic() + 30
        while len(certified) < len(before_restart) + 20 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert len(before_restart) >= 20 and len(certified) > len(before_restart)
    if controller.db is None:
        assert controller.query("PRAGMA integrity_check") == [("ok",)]
    registry = {name: idx for name, idx in controller.query("SELECT name, block_index FROM nodes")}
    issued = {r[0] for r in controller.query("SELECT node FROM certificates WHERE kind = 'node'")}
    [(enrolled_audits,)] = controller.query("SELECT count(*) FROM audit WHERE action = 'node.enrolled'")
    # every node that got a certificate is in the registry, and its certificate is recorded
    assert set(certified) <= set(registry)
    assert set(certified) <= issued
    assert enrolled_audits == len(registry)
    # no address was allocated twice
    assert len(set(registry.values())) == len(registry)
    prefixes = [ipaddress.ip_network(b) for blocks in certified.values() for b in blocks]
    for i, a in enumerate(prefixes):
        for b in prefixes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    listed = cli("meshctl", "nodes", "list", "--json", env=controller.env, check=True).stdout
    assert all(f'"{name}"' in listed for name in certified)
