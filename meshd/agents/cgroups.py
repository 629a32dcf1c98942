"""The node's agent cgroups on cgroup2: ``<root>/idmesh-<node>/agent-<n>``, one directory per agent.

An agent's directory is named after its number (the offset of its address
in the node's block, as its mark is), not its id: the process that asks to
become an agent is moved in while the controller is still signing (see
:meth:`meshd.agents.net.AgentNet.stage`), and cgroup2 cannot rename.

:class:`CgroupTree` is the thin shell over cgroupfs that :class:`meshd.agents.net.AgentNet`
drives; :class:`AgentCgroups` is the protocol it needs, so unit tests run it
against an in-memory fake.

Where cgroup2 lives (:func:`locate_cgroup2`):

* a unified host: ``/sys/fs/cgroup`` itself;
* a hybrid host (cgroup v1 controllers on a tmpfs at ``/sys/fs/cgroup``):
  ``/sys/fs/cgroup/unified``, used as it is — nothing is mounted over the v1
  tree, which would hide it from the whole host;
* inside ``ip netns exec``, which mounts a fresh sysfs, ``/sys/fs/cgroup`` is
  an empty directory: cgroup2 is mounted there, in that mount namespace only
  (it goes away with the namespace; the hierarchy is the machine's one, so
  the directories created are visible from the host as well).

nftables (``socket cgroupv2 level N "<path>"``) resolves a cgroup by
``stat("/sys/fs/cgroup/<path>")`` when a rule or element is loaded and keeps
only its 64-bit id, so the tree must lie below ``/sys/fs/cgroup``; on a
hybrid host the path handed to nft starts with ``unified/``. ``N`` is the
depth below the hierarchy's root, whatever the mount point.

Agents are flat (siblings under the node's directory): a socket is matched
by its level-``N`` ancestor, so a nested cgroup would be counted as its
parent agent.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from meshcore.errors import IdmeshError, InvalidInput, NotFound, PermissionDenied, Unavailable

__all__ = [
    "NFT_CGROUP_BASE",
    "AgentCgroups",
    "Cgroup2",
    "CgroupTree",
    "check_agent_name",
    "check_cgroup_parent",
    "locate_cgroup2",
    "own_cgroup",
]

NFT_CGROUP_BASE = Path("/sys/fs/cgroup")
"""nft resolves ``socket cgroupv2`` paths relative to this directory (compiled into nftables)."""

_AGENT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")
log = logging.getLogger("meshd.agents.cgroups")


def check_agent_name(agent_id: str) -> str:
    """An agent id usable as a cgroup directory and an nft string: the SPIFFE name alphabet, no ``cgroup.*``."""
    if not _AGENT_NAME.match(agent_id) or agent_id in (".", "..") or agent_id.startswith("cgroup."):
        raise InvalidInput(f"agent id {agent_id!r} is not usable as a cgroup name "
                           "(1-128 of A-Z a-z 0-9 . _ -, not '.', '..' or 'cgroup.*')")
    return agent_id


_PARENT_PART = re.compile(r"^[A-Za-z0-9._@:-]{1,255}\Z")  # what systemd's slices, services and scopes are named


def check_cgroup_parent(parent: str) -> str:
    """The node's cgroup directory below the hierarchy's root, e.g. ``system.slice/meshd.service/idmesh-idmesh0``:
    each part a plain cgroup name (it goes into nft strings too), none ``.``, ``..`` or ``cgroup.*``."""
    parts = parent.split("/")
    if not all(_PARENT_PART.match(part) and part not in (".", "..") and not part.startswith("cgroup.")
               for part in parts):
        raise InvalidInput(f"{parent!r} is not usable as a cgroup name path (parts of A-Z a-z 0-9 . _ @ : -)")
    return parent


def own_cgroup(proc: Path = Path("/proc/self/cgroup")) -> str:
    """This process's cgroup2 path below the hierarchy's root (``system.slice/meshd.service``; ``""``: the root).

    Agent cgroups go below it, so under systemd they stay inside the
    subtree ``Delegate=yes`` hands to meshd.service, and stopping the unit
    accounts for (and can reach) them.
    """
    for line in proc.read_text().splitlines():
        if line.startswith("0::"):
            return line[3:].strip("/")
    return ""


def _is_cgroup2(path: Path) -> bool:
    return (path / "cgroup.controllers").is_file()


def _mount_cgroup2(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(b"cgroup2", os.fsencode(path), b"cgroup2", 0, None) != 0:
        err = ctypes.get_errno()
        cls = PermissionDenied if err in (errno.EPERM, errno.EACCES) else Unavailable
        raise cls(f"cannot mount cgroup2 at {path}: {os.strerror(err)}")


@dataclass(frozen=True)
class Cgroup2:
    """Where the node's agent cgroups go, and how nft names them."""

    directory: Path
    """``<cgroup2>/idmesh-<node>``: the node's parent cgroup."""
    nft_prefix: str
    """``directory`` relative to :data:`NFT_CGROUP_BASE`: what an nft element starts with."""
    agent_level: int
    """Depth of an agent's cgroup below the hierarchy root: the ``level`` of ``socket cgroupv2``."""
    tree: str = ""
    """``directory`` as ``/proc/<pid>/cgroup`` names it: its path below the hierarchy root, from ``/``."""
    mounted: bool = False
    """True when cgroup2 was mounted by :func:`locate_cgroup2` (inside ``ip netns exec``)."""


def locate_cgroup2(root: Path, parent: str, *, mount: bool = True) -> Cgroup2:
    """Find (or mount, see the module doc) the cgroup2 tree at ``root`` and place ``parent`` in it."""
    mounted = False
    if not _is_cgroup2(root):
        if _is_cgroup2(root / "unified"):
            root = root / "unified"
        elif mount and root.is_dir() and not any(root.iterdir()):
            _mount_cgroup2(root)
            mounted = True
        else:
            raise Unavailable(f"no cgroup2 hierarchy at {root} (nor at {root}/unified): agents need cgroup2; "
                              "mount it (mount -t cgroup2 none /sys/fs/cgroup) or boot with "
                              "systemd.unified_cgroup_hierarchy=1")
    root = Path(os.path.realpath(root))
    try:
        relative = (root / parent).relative_to(NFT_CGROUP_BASE)
    except ValueError:
        raise Unavailable(f"cgroup2 tree {root} is not below {NFT_CGROUP_BASE}, where nft looks up "
                          "'socket cgroupv2' paths") from None
    depth = 0  # of ``root`` below the hierarchy's root: walk up while the parent is a cgroup too
    here = root
    while here.parent != here and _is_cgroup2(here.parent):
        depth, here = depth + 1, here.parent
    agent_level = depth + len(Path(parent).parts) + 1  # an agent is one below the node's directory
    return Cgroup2(root / parent, str(relative), agent_level, "/" + str((root / parent).relative_to(here)), mounted)


class AgentCgroups(Protocol):
    """What :class:`~meshd.agents.net.AgentNet` needs from cgroupfs (real: :class:`CgroupTree`)."""

    def prepare(self) -> Cgroup2:
        """Locate cgroup2, create the node's directory, kill and remove what a crashed run left; return where."""
        ...

    def create(self, agent_id: str) -> Path: ...

    def path(self, name: str) -> Path:
        """Where cgroup ``name`` is (made or not)."""
        ...

    def move_home(self, pid: int, home: str) -> None:
        """Move ``pid`` into cgroup ``home``, named as ``/proc/<pid>/cgroup`` names it (``/user.slice/x``)."""
        ...

    def move(self, agent_id: str, pid: int) -> None: ...

    def populated(self, agent_id: str) -> bool: ...

    def kill(self, agent_id: str | None) -> None:
        """SIGKILL every process of the agent (``None``: of every agent) and wait until they are gone."""
        ...

    def remove(self, agent_id: str) -> None:
        """Remove the agent's cgroup (killing what is still in it first)."""
        ...

    def exists(self, agent_id: str) -> bool: ...

    def close(self) -> None:
        """Kill and remove everything under the node's directory, then the directory itself."""
        ...


class CgroupTree:
    """The real :class:`AgentCgroups`: directories, ``cgroup.procs``, ``cgroup.events``, ``cgroup.kill``."""

    def __init__(self, root: Path, parent: str, *, kill_timeout: float = 5.0) -> None:
        self.root = root
        self.parent = parent
        self.kill_timeout = kill_timeout
        self._where: Cgroup2 | None = None

    @property
    def directory(self) -> Path:
        if self._where is None:
            raise Unavailable(f"cgroup {self.parent} is not prepared (call start() first)")
        return self._where.directory

    def prepare(self) -> Cgroup2:
        where = locate_cgroup2(self.root, self.parent)
        self._where = where
        if where.directory.exists():
            stale = sorted(p.name for p in where.directory.iterdir() if p.is_dir())
            if stale:
                log.warning("cgroup %s: killing and removing agents a previous run left: %s",
                            where.directory, ", ".join(stale))
            self._remove_tree(where.directory, keep_top=True)
        else:
            try:
                where.directory.mkdir()
            except OSError as exc:
                raise _mapped(exc, f"cannot create cgroup {where.directory}") from exc
        return where

    def _path(self, agent_id: str) -> Path:
        return self.directory / check_agent_name(agent_id)

    def create(self, agent_id: str) -> Path:
        path = self._path(agent_id)
        try:
            path.mkdir()
        except OSError as exc:
            raise _mapped(exc, f"cannot create cgroup {path} for agent {agent_id}") from exc
        return path

    def path(self, name: str) -> Path:
        return self._path(name)

    def move_home(self, pid: int, home: str) -> None:
        where = self._where
        if where is None or not where.tree or not str(where.directory).endswith(where.tree):
            raise Unavailable(f"cgroup {self.parent} is not prepared (call start() first)")
        hierarchy = Path(str(where.directory).removesuffix(where.tree))
        target = hierarchy / home.lstrip("/") / "cgroup.procs"
        try:
            target.write_text(f"{pid}\n")
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise NotFound(f"cannot move pid {pid} back to cgroup {home}: no such process") from exc
            raise _mapped(exc, f"cannot move pid {pid} back to cgroup {home}") from exc

    def exists(self, agent_id: str) -> bool:
        return self._path(agent_id).is_dir()

    def move(self, agent_id: str, pid: int) -> None:
        path = self._path(agent_id)
        try:
            (path / "cgroup.procs").write_text(f"{pid}\n")
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise NotFound(f"cannot move pid {pid} into cgroup {path} of agent {agent_id}: "
                               "no such process") from exc
            raise _mapped(exc, f"cannot move pid {pid} into cgroup {path} of agent {agent_id}") from exc

    def populated(self, agent_id: str) -> bool:
        return _populated(self._path(agent_id))

    def kill(self, agent_id: str | None) -> None:
        path = self.directory if agent_id is None else self._path(agent_id)
        if path.exists():
            _kill(path, self.kill_timeout)

    def remove(self, agent_id: str) -> None:
        self._remove_tree(self._path(agent_id), keep_top=False)

    def close(self) -> None:
        if self._where is not None and self._where.directory.exists():
            self._remove_tree(self._where.directory, keep_top=False)

    def _remove_tree(self, top: Path, *, keep_top: bool) -> None:
        """``cgroup.kill`` kills the whole subtree at once; then the directories go, deepest first."""
        if not top.exists():
            return
        _kill(top, self.kill_timeout)
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for path in dirs if keep_top else [*dirs, top]:
            _rmdir(path, self.kill_timeout)


def _mapped(exc: OSError, what: str) -> IdmeshError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        return PermissionDenied(f"{what}: {reason} (meshd needs root or a delegated cgroup)")
    if exc.errno == errno.ENOENT:
        return NotFound(f"{what}: {reason}")
    return Unavailable(f"{what}: {reason}")


def _populated(path: Path) -> bool:
    try:
        events = (path / "cgroup.events").read_text()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise _mapped(exc, f"cannot read {path}/cgroup.events") from exc
    return any(line == "populated 1" for line in events.splitlines())


def _kill(path: Path, timeout: float) -> None:
    """SIGKILL everything in the subtree (``cgroup.kill``, Linux 5.14+; else pid by pid) and wait until empty."""
    deadline = time.monotonic() + timeout
    kill_file = path / "cgroup.kill"
    while _populated(path):
        try:
            if kill_file.exists():
                kill_file.write_text("1\n")
            else:
                for procs in [path / "cgroup.procs", *path.rglob("cgroup.procs")]:
                    for pid in procs.read_text().split():
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _mapped(exc, f"cannot kill the processes of cgroup {path}") from exc
        end = min(deadline, time.monotonic() + 0.5)
        while _populated(path) and time.monotonic() < end:
            time.sleep(0.002)
        if time.monotonic() >= deadline and _populated(path):
            raise Unavailable(f"cgroup {path}: processes still running {timeout:g} s after SIGKILL "
                              "(stuck in the kernel?)")


def _holding(path: Path) -> str:
    """What keeps a cgroup busy, for the error message: its processes and child cgroups."""
    try:
        pids = (path / "cgroup.procs").read_text().split()
        children = [p.name for p in path.iterdir() if p.is_dir()]
    except OSError:
        return ""
    def state(pid: str) -> str:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            return f"{pid}:{stat[stat.index('(') + 1:stat.rindex(')')]}:{stat.rpartition(')')[2].split()[0]}"
        except OSError:
            return f"{pid}:gone"
    return f" (processes {' '.join(map(state, pids)) or 'none'}; child cgroups {' '.join(children) or 'none'})"


def _rmdir(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            # EBUSY: killed tasks still exiting, or a late joiner: a process spawned with
            # AgentSlot.command() that wrote itself into cgroup.procs after the kill. Kill again.
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise _mapped(exc, f"cannot remove cgroup {path}{_holding(path)}") from exc
            if _populated(path):
                _kill(path, max(0.1, deadline - time.monotonic()))
            else:
                time.sleep(0.005)
