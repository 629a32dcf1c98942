"""The systemd units in ``systemd/``, rendered for a place: pure text functions.

The files in the repository are the source of truth and name the defaults:
``/opt/idmesh`` (the virtual environment deploy installs), ``/var/lib/meshd``,
``/run/meshd/meshd.sock``, ``idmesh0``. :func:`render_unit` rewrites exactly
those lines — the ``ExecStart=`` prefix and the ``Environment=IDMESH_*``
defaults — and, for a state or socket directory outside the unit's own
directories, adds a ``ReadWritePaths=`` line (``ProtectSystem=strict`` makes
everything else read-only). Nothing else changes, so a rendered unit is as
hardened as the file it came from.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from meshcore.errors import InvalidInput, NotFound

__all__ = ["DEFAULT_INSTALL_DIR", "UNIT_DIR", "find_unit", "render_meshd_unit", "render_unit"]

DEFAULT_INSTALL_DIR = "/opt/idmesh"
UNIT_DIR = "/etc/systemd/system"


def find_unit(name: str, source: Path | None = None) -> Path:
    """``systemd/<name>`` of the source tree (``source``, else the tree this package lives in), else the
    copy an installed wheel put in ``<prefix>/share/idmesh/systemd``."""
    roots = [source] if source is not None else [Path(__file__).resolve().parent.parent]
    candidates = [root / "systemd" / name for root in roots]
    candidates.append(Path(sys.prefix) / "share" / "idmesh" / "systemd" / name)
    for path in candidates:
        if path.is_file():
            return path
    raise NotFound(f"cannot find {name} (looked for {', '.join(str(c) for c in candidates)}); "
                   "pass the source tree with --source")


def render_unit(text: str, *, install_dir: str = DEFAULT_INSTALL_DIR, environment: Mapping[str, str] | None = None,
                writable: tuple[str, ...] = ()) -> str:
    """``text`` with ExecStart*= under ``install_dir`` and the given ``Environment=`` values replaced."""
    environment = dict(environment or {})
    install = _quote(install_dir.rstrip("/") or "/")
    out = []
    seen: set[str] = set()
    for line in text.splitlines(keepends=True):
        if re.match(r"^Exec(Start|StartPre|StartPost|Reload|Stop|StopPost)=", line):
            key, _, command = line.partition("=")
            command = re.sub(r"^([-@:+!]*)" + re.escape(DEFAULT_INSTALL_DIR) + "/",
                             lambda m: m.group(1) + install + "/", command, count=1)
            line = f"{key}={command}"
        match = re.match(r"^Environment=([A-Z_][A-Z0-9_]*)=(.*)$", line)
        if match and match.group(1) in environment:
            seen.add(match.group(1))
            line = f"Environment={match.group(1)}={_quote(environment[match.group(1)])}\n"
        out.append(line)
    extra = [f"Environment={k}={_quote(environment[k])}\n" for k in sorted(set(environment) - seen)]
    extra += [f"ReadWritePaths=-{_quote(path)}\n" for path in writable]
    at = _after_last(out, ("Environment=", "EnvironmentFile="))
    out[at:at] = extra
    return "".join(out)


def _after_last(lines: list[str], prefixes: tuple[str, ...]) -> int:
    found = [i for i, line in enumerate(lines) if line.startswith(prefixes)]
    return (max(found) + 1) if found else len(lines)


def _quote(value: str) -> str:
    """Values go in unquoted; anything that would need quoting or %-escaping is refused."""
    if not re.fullmatch(r"[A-Za-z0-9_./:@+,=-]+", value):
        raise InvalidInput(f"{value!r} cannot be written into a systemd unit as it is "
                           "(use letters, digits and _ . / : @ + , = -)")
    return value


def render_meshd_unit(text: str, *, install_dir: str, state: str, socket: str, interface: str) -> str:
    """meshd.service for one host: its install directory, state, socket and interface."""
    writable = []
    if not _inside(state, "/var/lib/meshd"):
        writable.append(state)
    socket_dir = str(PurePosixPath(socket).parent)
    if not _inside(socket_dir, "/run/meshd"):
        writable.append(socket_dir)
    env = {"IDMESH_STATE": state, "IDMESH_SOCKET": socket, "IDMESH_INTERFACE": interface}
    return render_unit(text, install_dir=install_dir, environment=env, writable=tuple(writable))


def _inside(path: str, top: str) -> bool:
    p, t = PurePosixPath(path), PurePosixPath(top)
    return p == t or t in p.parents
