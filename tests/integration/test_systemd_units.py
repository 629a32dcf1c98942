"""The systemd units in systemd/: valid for systemd, hardened, consistent with the code's defaults.

``systemd-analyze verify`` checks syntax, unknown settings and that the
ExecStart binaries exist, so each unit is first rendered (with deploy's own
renderer) for this test's virtual environment instead of /opt/idmesh, into a
tmp directory. Any output of ``verify`` is a failure (it reports unknown keys
as warnings and still exits 0). ``systemd-analyze security --offline`` scores
the sandbox; a unit that loses hardening fails the threshold.

systemd-analyze is in Debian's ``systemd`` package. Missing, these tests
fail rather than skip: a unit nobody verified is a unit that may not start.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.inventory import parse_inventory
from deploy.units import DEFAULT_INSTALL_DIR, render_meshd_unit, render_unit
from idmesh.paths import DEFAULT_DATA, DEFAULT_SOCKET, DEFAULT_STATE
from meshctl.main import build_parser as meshctl_parser

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
VENV = Path(sys.executable).parent.parent  # ExecStart=<venv>/bin/meshd exists here


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing (apt-get install systemd): the units cannot be verified",
                    pytrace=False)
    return path


def settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit, every value of a repeated key, comments skipped."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def one(unit: dict[str, list[str]], key: str) -> str:
    assert len(unit.get(key, [])) == 1, f"{key}: {unit.get(key)}"
    return unit[key][0]


def rendered(tmp_path: Path, name: str, text: str | None = None) -> Path:
    text = text if text is not None else render_unit((UNITS / name).read_text(), install_dir=str(VENV))
    path = tmp_path / name
    path.write_text(text)
    return path


def verify(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([analyze(), "verify", *map(str, paths)], capture_output=True, text=True, timeout=60,
                          check=False)


def test_both_units_verify_cleanly(tmp_path: Path) -> None:
    done = verify(rendered(tmp_path, "mesh-controller.service"), rendered(tmp_path, "meshd.service"))
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The test's own check: an unknown key and a missing binary are reported."""
    text = (UNITS / "meshd.service").read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=yes\nBogusKey=1")
    done = verify(rendered(tmp_path, "meshd.service", text))
    assert "BogusKey" in done.stdout + done.stderr
    done = verify(rendered(tmp_path, "mesh-controller.service", (UNITS / "mesh-controller.service").read_text()
                           .replace(DEFAULT_INSTALL_DIR, str(tmp_path / "nowhere"))))
    assert done.returncode != 0 and "nowhere" in done.stdout + done.stderr


def test_a_unit_rendered_by_deploy_for_other_places_verifies(tmp_path: Path) -> None:
    text = render_meshd_unit((UNITS / "meshd.service").read_text(), install_dir=str(VENV),
                             state="/srv/mesh/state", socket="/srv/mesh/run/meshd.sock", interface="mesh7")
    unit = settings(text)
    assert "IDMESH_STATE=/srv/mesh/state" in unit["Environment"]
    assert "IDMESH_INTERFACE=mesh7" in unit["Environment"]
    assert unit["ReadWritePaths"] == ["-/srv/mesh/state", "-/srv/mesh/run"]
    done = verify(rendered(tmp_path, "meshd.service", text))
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


@pytest.mark.parametrize(("name", "threshold"), [("mesh-controller.service", 20), ("meshd.service", 40)])
def test_exposure_stays_low(tmp_path: Path, name: str, threshold: int) -> None:
    """systemd's own score (0 = locked down .. 100 = exposed); today 1.2 and 3.6 (x10)."""
    done = subprocess.run([analyze(), "security", "--offline=yes", f"--threshold={threshold}",
                           str(rendered(tmp_path, name))], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr


def test_meshd_unit_hardening_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    unit = settings((UNITS / "meshd.service").read_text())
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "Restart": "on-failure", "Delegate": "yes", "StateDirectory": "meshd",
                       "AmbientCapabilities": "", "DevicePolicy": "closed", "DeviceAllow": "/dev/net/tun rw"}.items():
        assert one(unit, key) == value, key
    assert set(one(unit, "CapabilityBoundingSet").split()) == {"CAP_NET_ADMIN", "CAP_CHOWN", "CAP_DAC_OVERRIDE",
                                                              "CAP_NET_RAW"}
    assert "meshd" in one(unit, "RuntimeDirectory").split()
    env = dict(e.split("=", 1) for e in unit["Environment"])
    assert env["IDMESH_STATE"] == DEFAULT_STATE == f"/var/lib/{one(unit, 'StateDirectory')}"
    assert env["IDMESH_SOCKET"] == DEFAULT_SOCKET
    monkeypatch.delenv("IDMESH_SOCKET", raising=False)
    meshctl = meshctl_parser()
    for command in ("status", "whois 100.64.0.1", "agent list", "agent run --principal p --scope s:r"):
        assert str(meshctl.parse_args(command.split()).socket) == DEFAULT_SOCKET, command  # meshctl finds this meshd
    assert Path(env["IDMESH_SOCKET"]).parent == Path("/run") / "meshd"  # inside RuntimeDirectory=meshd
    assert env["IDMESH_INTERFACE"] == "idmesh0"
    assert one(unit, "ExecStart") == f"{DEFAULT_INSTALL_DIR}/bin/meshd run"
    # nothing that would make /sys/fs/cgroup read-only or hide /dev/net/tun
    for absent in ("ProtectControlGroups", "ProtectKernelTunables", "PrivateDevices"):
        assert absent not in unit, absent


def test_controller_unit_hardening_and_defaults() -> None:
    unit = settings((UNITS / "mesh-controller.service").read_text())
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "Restart": "on-failure", "DynamicUser": "yes", "StateDirectory": "idmesh",
                       "CapabilityBoundingSet": "", "AmbientCapabilities": ""}.items():
        assert one(unit, key) == value, key
    env = dict(e.split("=", 1) for e in unit["Environment"])
    assert env["IDMESH_DATA"] == DEFAULT_DATA == f"/var/lib/{one(unit, 'StateDirectory')}"
    assert one(unit, "ExecStart").startswith(f"{DEFAULT_INSTALL_DIR}/bin/mesh-controller serve ")


def test_deploy_installs_where_the_units_look() -> None:
    inventory = parse_inventory("hosts:\n  db-1: {address: 10.0.0.5, tags: [db], known_hosts: ignore}\n")
    host = inventory.hosts[0]
    unit = settings((UNITS / "meshd.service").read_text())
    env = dict(e.split("=", 1) for e in unit["Environment"])
    assert host.install_dir == DEFAULT_INSTALL_DIR
    assert (host.state, host.socket, host.interface) == (env["IDMESH_STATE"], env["IDMESH_SOCKET"],
                                                         env["IDMESH_INTERFACE"])
    default = render_meshd_unit((UNITS / "meshd.service").read_text(), install_dir=host.install_dir, state=host.state,
                                socket=host.socket, interface=host.interface)
    assert default == (UNITS / "meshd.service").read_text()  # a default host gets the file as it is
