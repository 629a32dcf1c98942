"""The wheels a deployment installs: idmesh's own, and everything it depends on.

Hosts install offline (``pip install --no-index --find-links``): they need
no access to a package index, only SSH. So the machine running deploy
provides every wheel:

* the project wheel: ``--wheel FILE``, else the ``idmesh-*.whl`` of
  ``--wheelhouse DIR``, else built from the source tree (a copy of it, so the
  tree is never written to) with ``pip wheel --no-deps``;
* its dependencies: the other wheels of ``--wheelhouse DIR``, else collected
  with ``pip wheel`` (this machine's index or cache) the first time a host
  needs them — a run where every host is current builds nothing more.

Wheels with compiled code are for this machine's platform and Python; hosts
must match it (or give a wheelhouse built for them).

Whether a host has this build is decided by :func:`wheel_digest`, a hash of
the wheel's *contents* (zip timestamps and RECORD excluded), so rebuilding
the same source is "unchanged", and any change to the source is an upgrade
even when the version number stayed the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from meshcore.errors import InvalidInput, NotFound, Unavailable

__all__ = ["PROJECT", "Artifacts", "Wheel", "parse_wheel_name", "wheel_digest"]

PROJECT = "idmesh"
_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis",
                                 "build", "dist", "*.pyc")


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str
    version: str
    digest: str


def parse_wheel_name(filename: str) -> tuple[str, str]:
    """``idmesh-0.1.0-py3-none-any.whl`` -> ``("idmesh", "0.1.0")`` (names normalised as pip does)."""
    parts = filename.removesuffix(".whl").split("-")
    if not filename.endswith(".whl") or len(parts) < 5:
        raise InvalidInput(f"{filename} is not a wheel file name (NAME-VERSION-PY-ABI-PLATFORM.whl)")
    return parts[0].lower().replace("_", "-").replace(".", "-"), parts[1]


def wheel_digest(path: Path) -> str:
    """SHA-256 over the sorted (member name, member content hash) pairs, RECORD excluded."""
    outer = hashlib.sha256()
    try:
        with zipfile.ZipFile(path) as archive:
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                if info.is_dir() or info.filename.endswith(".dist-info/RECORD"):
                    continue
                outer.update(info.filename.encode() + b"\0" + hashlib.sha256(archive.read(info)).digest())
    except (OSError, zipfile.BadZipFile) as exc:
        raise InvalidInput(f"{path} is not a readable wheel: {exc}") from exc
    return outer.hexdigest()


def _wheel(path: Path) -> Wheel:
    name, version = parse_wheel_name(path.name)
    return Wheel(path, name, version, wheel_digest(path))


class Artifacts:
    """Finds or builds the wheels once per run; temporary files go with :meth:`close`."""

    def __init__(self, *, wheel: Path | None = None, wheelhouse: Path | None = None, source: Path | None = None,
                 python: str = sys.executable) -> None:
        self._wheel_arg = wheel
        self._house = wheelhouse
        self._source = source
        self._python = python
        self._tmp: Path | None = None
        self._project: Wheel | None = None
        self._deps: list[Path] | None = None
        self._lock = asyncio.Lock()
        if wheel is not None and not wheel.is_file():
            raise NotFound(f"no wheel at {wheel}")
        if wheelhouse is not None and not wheelhouse.is_dir():
            raise NotFound(f"no wheelhouse directory at {wheelhouse}")

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _scratch(self, name: str) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="idmesh-deploy-"))
        path = self._tmp / name
        path.mkdir(exist_ok=True)
        return path

    def project(self) -> Wheel:
        """The idmesh wheel to install (found or built, once)."""
        if self._project is None:
            self._project = _wheel(self._find_or_build())
            if self._project.name != PROJECT:
                raise InvalidInput(f"{self._project.path.name} is not an {PROJECT} wheel")
        return self._project

    def _find_or_build(self) -> Path:
        if self._wheel_arg is not None:
            return self._wheel_arg
        if self._house is not None:
            ours = sorted(p for p in self._house.glob("*.whl") if parse_wheel_name(p.name)[0] == PROJECT)
            if len(ours) == 1:
                return ours[0]
            if len(ours) > 1:
                raise InvalidInput(f"{self._house} holds several {PROJECT} wheels ({', '.join(p.name for p in ours)}): "
                                   "name one with --wheel")
        return self.build_project()

    def source_tree(self) -> Path:
        source = self._source or Path(__file__).resolve().parent.parent
        if not (source / "pyproject.toml").is_file():
            raise NotFound(f"no wheel to deploy: {source} is not the {PROJECT} source tree; "
                           "give --wheel FILE, --wheelhouse DIR or --source DIR")
        return source

    def build_project(self) -> Path:
        """``pip wheel --no-deps`` of a copy of the source tree."""
        source = self.source_tree()
        copy = self._scratch("src") / "idmesh"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(source, copy, ignore=_IGNORE)
        out = self._scratch("project")
        self._pip("wheel", "--no-deps", "--wheel-dir", str(out), str(copy), what=f"building the wheel of {source}")
        built = sorted(out.glob(f"{PROJECT}-*.whl"))
        if len(built) != 1:
            raise Unavailable(f"building the wheel of {source} produced {len(built)} {PROJECT} wheels")
        return built[0]

    async def uploads(self) -> list[Path]:
        """Every wheel a host installs from: the project wheel first, then its dependencies (collected once)."""
        project = self.project()
        async with self._lock:
            if self._deps is None:
                self._deps = await asyncio.to_thread(self._dependencies, project.path)
        return [project.path, *self._deps]

    def _dependencies(self, project: Path) -> list[Path]:
        if self._house is not None:
            house = self._house
        else:
            house = self._scratch("wheelhouse")
            self._pip("wheel", "--wheel-dir", str(house), str(project),
                      what=f"collecting the dependencies of {project.name} (or give --wheelhouse DIR)")
        return sorted(p for p in house.glob("*.whl") if parse_wheel_name(p.name)[0] != PROJECT)

    def _pip(self, *args: str, what: str) -> None:
        argv = [self._python, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q", *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"{what}: {exc}") from exc
        if done.returncode != 0:
            lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:]
            raise Unavailable(f"{what} failed: {errors[0] if errors else f'pip exited with {done.returncode}'}")
