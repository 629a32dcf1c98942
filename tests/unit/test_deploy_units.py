"""meshd.service rendered for a host, and the wheels' content digest."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from deploy.artifacts import parse_wheel_name, wheel_digest
from deploy.units import find_unit, render_meshd_unit, render_unit
from meshcore.errors import InvalidInput, NotFound

REPO = Path(__file__).resolve().parents[2]
MESHD = (REPO / "systemd" / "meshd.service").read_text()


def lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_the_default_place_renders_the_file_unchanged() -> None:
    assert render_meshd_unit(MESHD, install_dir="/opt/idmesh", state="/var/lib/meshd",
                             socket="/run/meshd/meshd.sock", interface="idmesh0") == MESHD


def test_another_place_changes_exactly_the_lines_that_name_it() -> None:
    text = render_meshd_unit(MESHD, install_dir="/srv/idmesh/", state="/srv/meshd", socket="/srv/run/meshd.sock",
                             interface="mesh1")
    assert lines(text, "ExecStart=") == ["ExecStart=/srv/idmesh/bin/meshd run"]
    assert lines(text, "Environment=") == ["Environment=IDMESH_STATE=/srv/meshd",
                                           "Environment=IDMESH_SOCKET=/srv/run/meshd.sock",
                                           "Environment=IDMESH_INTERFACE=mesh1"]
    assert lines(text, "ReadWritePaths=") == ["ReadWritePaths=-/srv/meshd", "ReadWritePaths=-/srv/run"]
    unchanged = [ln for ln in MESHD.splitlines() if not ln.startswith(("ExecStart=", "Environment="))]
    assert [ln for ln in text.splitlines() if not ln.startswith(("ExecStart=", "Environment=", "ReadWritePaths="))] \
        == unchanged  # every hardening line as it was


def test_paths_below_the_units_own_directories_need_no_extra_write_access() -> None:
    text = render_meshd_unit(MESHD, install_dir="/opt/idmesh", state="/var/lib/meshd/node2",
                             socket="/run/meshd/node2.sock", interface="idmesh1")
    assert not lines(text, "ReadWritePaths=")


def test_prefixed_exec_lines_and_new_variables() -> None:
    text = "[Service]\nEnvironment=A=1\nExecStartPre=+/opt/idmesh/bin/x --y /opt/idmesh/z\nExecStart=/usr/bin/true\n"
    out = render_unit(text, install_dir="/v", environment={"A": "2", "B": "3"})
    assert out == ("[Service]\nEnvironment=A=2\nEnvironment=B=3\nExecStartPre=+/v/bin/x --y /opt/idmesh/z\n"
                   "ExecStart=/usr/bin/true\n")


@pytest.mark.parametrize("bad", ["/srv/with space", "/srv/100%", '/srv/"q"'])
def test_values_that_would_need_quoting_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput, match="cannot be written into a systemd unit"):
        render_meshd_unit(MESHD, install_dir="/opt/idmesh", state=bad, socket="/run/meshd/meshd.sock",
                          interface="idmesh0")


def test_find_unit(tmp_path: Path) -> None:
    assert find_unit("meshd.service") == REPO / "systemd" / "meshd.service"
    with pytest.raises(NotFound, match="pass the source tree with --source"):
        find_unit("meshd.service", tmp_path)


def _wheel(path: Path, files: dict[str, str], date: tuple[int, int, int, int, int, int]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(zipfile.ZipInfo(name, date), content)
        z.writestr(zipfile.ZipInfo("idmesh-0.1.0.dist-info/RECORD", date), f"built {date}")
    return path


def test_the_digest_follows_content_not_build_time(tmp_path: Path) -> None:
    files = {"meshd/cli.py": "print(1)\n", "idmesh-0.1.0.dist-info/METADATA": "Name: idmesh\n"}
    a = _wheel(tmp_path / "a.whl", files, (2026, 1, 1, 0, 0, 0))
    b = _wheel(tmp_path / "b.whl", dict(reversed(files.items())), (2026, 6, 1, 12, 0, 0))
    c = _wheel(tmp_path / "c.whl", {**files, "meshd/cli.py": "print(2)\n"}, (2026, 1, 1, 0, 0, 0))
    assert wheel_digest(a) == wheel_digest(b) != wheel_digest(c)
    (tmp_path / "junk.whl").write_text("not a zip")
    with pytest.raises(InvalidInput, match="not a readable wheel"):
        wheel_digest(tmp_path / "junk.whl")


def test_wheel_names() -> None:
    assert parse_wheel_name("idmesh-0.1.0-py3-none-any.whl") == ("idmesh", "0.1.0")
    assert parse_wheel_name("typing_extensions-4.16.0-py3-none-any.whl") == ("typing-extensions", "4.16.0")
    with pytest.raises(InvalidInput):
        parse_wheel_name("idmesh.tar.gz")
