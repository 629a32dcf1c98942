"""The helper deploy runs on each host, run here against a temporary directory and a stand-in meshd."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy import remote

FAKE_MESHD = f"""#!{sys.executable}
import os, signal, socket, sys, time
args = sys.argv
if os.environ.get("IDMESH_STATE"):
    sys.exit("IDMESH_STATE leaked into meshd's environment")
if "--fail" in open(os.path.join(args[args.index("--state") + 1], "mode")).read():
    print("meshd: error: this node is not enrolled", flush=True)
    sys.exit(3)
path = args[args.index("--socket") + 1]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen()
def bye(*_):
    os.unlink(path)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
while True:
    time.sleep(1)
"""


@pytest.fixture
def place(tmp_path: Path) -> Iterator[dict[str, Any]]:
    install = tmp_path / "opt"
    (install / "bin").mkdir(parents=True)
    meshd = install / "bin" / "meshd"
    meshd.write_text(FAKE_MESHD)
    meshd.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    (state / "mode").write_text("ok")
    args = {"install_dir": str(install), "state": str(state), "socket": str(tmp_path / "run" / "meshd.sock"),
            "interface": "idmesh9", "pidfile": str(state / "meshd.pid"), "log": str(state / "meshd.log"),
            "service": "process", "unit": "meshd.service", "unit_path": str(tmp_path / "meshd.service")}
    yield args
    try:  # a stand-in meshd a test started: a child of this process, by its pid
        pid = int(Path(args["pidfile"]).read_text())
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError):
        return
    if ppid == os.getpid():
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_probe_of_a_bare_host(place: dict[str, Any]) -> None:
    facts = remote.probe(place)
    assert facts["python"] == list(sys.version_info[:3]) and facts["ensurepip"] is True
    assert (facts["venv"], facts["deployed"], facts["pid"]) == (False, None, None)
    assert "node" not in facts and "node_error" not in facts


def test_probe_of_a_deployed_host(place: dict[str, Any]) -> None:
    (Path(place["install_dir"]) / "bin" / "python").symlink_to(sys.executable)
    remote.mark({**place, "marker": {"version": "0.1.0", "digest": "d1"}})
    node = {"name": "db-1", "ca_fingerprint": "c" * 64, "wireguard_public_key": "k", "addresses": ["100.64.0.1"],
            "domain": "acme.mesh"}
    (Path(place["state"]) / "node.json").write_text(json.dumps(node))
    facts = remote.probe(place)
    assert facts["venv"] and facts["deployed"] == {"version": "0.1.0", "digest": "d1"}
    assert facts["node"] == {k: node[k] for k in ("name", "ca_fingerprint", "wireguard_public_key", "addresses")}


def test_probe_reports_a_damaged_node_record(place: dict[str, Any]) -> None:
    (Path(place["state"]) / "node.json").write_text("{not json")
    assert "node.json cannot be read" in remote.probe(place)["node_error"]
    (Path(place["state"]) / "node.json").write_text("[]")
    assert remote.probe(place)["node_error"].endswith("node.json is not a node record")


def test_probe_in_systemd_mode_reads_the_unit(place: dict[str, Any]) -> None:
    Path(place["unit_path"]).write_text("[Service]\n")
    facts = remote.probe({**place, "service": "systemd"})
    assert facts["unit_text"] == "[Service]\n" and "pid" not in facts


def test_start_detaches_meshd_and_stop_ends_it(place: dict[str, Any]) -> None:
    os.environ["IDMESH_STATE"] = "/somewhere/else"  # the caller's environment must not redirect meshd
    try:
        pid = remote.start(place)["pid"]
    finally:
        del os.environ["IDMESH_STATE"]
    assert Path(place["pidfile"]).read_text() == f"{pid}\n"
    assert os.getsid(pid) == pid  # its own session: the SSH session's end does not reach it
    assert remote.probe(place)["pid"] == pid
    with pytest.raises(remote.Failure, match="already running"):
        remote.start(place)
    assert remote.stop(place) == {"stopped": pid}
    os.waitpid(pid, 0)  # our child here (on a host, init reaps it)
    assert remote.probe(place)["pid"] is None and not Path(place["pidfile"]).exists()
    assert remote.stop(place) == {"stopped": None}


def test_a_pidfile_naming_another_process_is_not_meshd(place: dict[str, Any]) -> None:
    Path(place["pidfile"]).write_text(f"{os.getpid()}\n")
    assert remote.probe(place)["pid"] is None
    assert remote.stop(place) == {"stopped": None}


def test_a_meshd_that_dies_at_start_is_reported_with_its_log(place: dict[str, Any]) -> None:
    (Path(place["state"]) / "mode").write_text("--fail")
    with pytest.raises(remote.Failure, match="meshd exited with 3: meshd: error: this node is not enrolled"):
        remote.start(place)


def test_main_prints_json_or_one_line(place: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert remote.main(["probe", json.dumps(place)]) == 0
    assert json.loads(capsys.readouterr().out)["venv"] is False
    assert remote.main(["nope", "{}"]) == 1
    assert capsys.readouterr().err == "KeyError: 'nope'\n"


def test_wait_times_out(place: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "READY_TIMEOUT", 0.2)
    started = time.monotonic()
    with pytest.raises(remote.Failure, match="did not open"):
        remote.wait(place)
    assert time.monotonic() - started < 5
