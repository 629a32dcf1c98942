"""Throwaway hosts for end-to-end tests: network namespaces on a bridge, cleaned up by name and PID.

Layout for ``Network(hosts=3)``::

    idm-<pid>-<n>-sw      the "switch": bridge br0 with ports p1..p3
    idm-<pid>-<n>-h1      eth0 198.51.100.11/24, 2001:db8::11/64 (veth to p1), lo up
    idm-<pid>-<n>-h2      eth0 198.51.100.12/24, 2001:db8::12/64
    ...

Every name carries the test process's PID and a per-process counter, so
parallel runs never collide, and a run that was killed outright can be
recognised afterwards (its PID is gone) and reaped by :func:`reap_stale`.
The veths are created inside the switch namespace and their host ends moved
straight into the host namespaces, so nothing ever appears in the root
namespace. Each host also gets a WireGuard interface name unique on the
machine (``host.wg_ifname``), because wireguard-go's socket directory
/var/run/wireguard is shared by all namespaces.

More hosts can be added after ``build()`` (``add_host``, then ``plug`` into
the switch or hang off a NAT router: :func:`tests.e2e.natlab.add_home`);
they are numbered on, and cleaned up like the others.

Cleanup (``close()``, also run by ``with`` on failure or Ctrl-C) stops the
processes started through ``host.popen`` (their process groups), then
anything else still running inside our namespaces (e.g. the wireguard-go
child of a helper that was killed), deletes the namespaces (which deletes
the veths and the bridge), removes stale UAPI sockets of our interface
names, and finally checks that nothing is left, raising if something is.

Commands run through ``ip netns exec``, which also remounts /sys for the
namespace (cgroup2 then needs mounting there; not needed here).
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["UAPI_DIR", "Host", "HostCommandError", "Network", "processes_mentioning", "reap_stale", "wait_until"]

UAPI_DIR = Path("/var/run/wireguard")
_NAME = re.compile(r"^idm-(\d+)-(\d+)-")
_sequence = itertools.count()


class HostCommandError(RuntimeError):
    """A command inside a host failed; the message carries its stderr so the test failure says why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise HostCommandError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy (which is returned); fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def netns_pids(netns: str) -> list[int]:
    """Live processes inside ``netns`` (``ip netns pids``), zombies excluded."""
    done = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit() and _alive(int(p))]


def _kill_pids(pids: Sequence[int], grace: float = 3.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.02)
        if not any(_alive(p) for p in pids):
            return


def _delete_netns(netns: str) -> None:
    _kill_pids(netns_pids(netns))
    _ip("netns", "del", netns, check=False)


def reap_stale(prefix: str = "idm-") -> list[str]:
    """Delete namespaces left by harness runs whose process is gone (killed before it could clean up)."""
    reaped = []
    for netns in _ip("netns", "list").stdout.split("\n"):
        name = netns.split(" ")[0]
        match = _NAME.match(name)
        if name.startswith(prefix) and match and not _alive(int(match.group(1))):
            _delete_netns(name)
            reaped.append(name)
    for sock in UAPI_DIR.glob("w*-*.sock"):
        match = re.match(r"^w([0-9a-f]+)-[0-9a-f]+h\d+(?:r\d+|gw)?\.sock$", sock.name)  # meshd's route tunnels too
        if match and not _alive(int(match.group(1), 16)) and not _listening(sock):
            sock.unlink(missing_ok=True)
    return reaped


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def processes_mentioning(words: Sequence[str]) -> list[str]:
    """Live processes whose command line contains one of ``words`` (our interface or namespace names)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if any(w in text for w in words) and _alive(int(entry.name)):
            found.append(f"pid {entry.name} ({' '.join(text).strip()})")
    return found


@dataclass
class Host:
    """One namespace. ``run``/``popen`` take an argv and execute it inside via ``ip netns exec``."""

    name: str
    index: int
    netns: str
    underlay4: str
    underlay6: str
    wg_ifname: str
    _network: Network = field(repr=False)

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
            input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run to completion; with ``check`` a non-zero exit raises :class:`HostCommandError` with stderr."""
        try:
            done = subprocess.run(self.argv(argv), check=False, capture_output=True, text=True, timeout=timeout,
                                  input=input, env=env)
        except subprocess.TimeoutExpired as exc:
            raise HostCommandError(f"{self.name}: {' '.join(argv)} did not finish in {timeout:g} s") from exc
        if check and done.returncode != 0:
            raise HostCommandError(f"{self.name}: {' '.join(argv)} exited with {done.returncode}: "
                                   f"{(done.stderr or done.stdout).strip()}")
        return done

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start in the background, in its own process group; the network stops it at cleanup."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(argv), start_new_session=True, **kwargs)
        self._network.processes.append(proc)
        return proc

    def pids(self) -> list[int]:
        return netns_pids(self.netns)


class Network:
    """N hosts on one bridge. Use as a context manager; ``close()`` is idempotent."""

    def __init__(self, hosts: int = 2, *, ipv6: bool = True) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError("1 to 200 hosts")
        seq = self._seq = next(_sequence)
        self.prefix = f"idm-{os.getpid()}-{seq}"
        self.switch = f"{self.prefix}-sw"
        self.ipv6 = ipv6
        self.processes: list[subprocess.Popen[Any]] = []
        self.hosts = [self._host(f"h{i}", i, f"198.51.100.{10 + i}", f"2001:db8::{10 + i}")
                      for i in range(1, hosts + 1)]
        self._namespaces: list[str] = []
        self._closed = False

    def _host(self, name: str, index: int, underlay4: str = "", underlay6: str = "") -> Host:
        """The record of a host (namespace ``<prefix>-<name>``) with a WireGuard name unique on the machine."""
        host = Host(name, index, f"{self.prefix}-{name}", underlay4, underlay6,
                    f"w{os.getpid():x}-{self._seq:x}h{index}", self)
        assert len(host.wg_ifname) <= 15, host.wg_ifname
        return host

    def add_host(self, name: str, underlay4: str = "", underlay6: str = "") -> Host:
        """Another host, after :meth:`build`: its namespace (lo up, no other link yet: :meth:`plug` it into the
        switch, or hang it off a router, :func:`tests.e2e.natlab.add_home`), covered by :meth:`close` like the
        others (processes, namespace, WireGuard sockets)."""
        host = self._host(name, max((h.index for h in self.hosts), default=0) + 1, underlay4, underlay6)
        self._add_netns(host.netns)
        self.hosts.append(host)
        return host

    def plug(self, host: Host, ifname: str = "eth0", addresses: Sequence[str] = ()) -> None:
        """A veth from the switch's bridge (port ``p<index>``) to ``ifname`` in ``host``, with ``addresses``, up."""
        port = f"p{host.index}"
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", host.netns)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        for one in addresses:
            _ip("-n", host.netns, "addr", "add", one, "dev", ifname, *(["nodad"] if ":" in one else []))
        _ip("-n", host.netns, "link", "set", ifname, "up")

    def __getitem__(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def __enter__(self) -> Self:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def build(self) -> None:
        self._add_netns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "mcast_snooping", "0")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts:
            self._add_netns(host.netns)
            self.plug(host, "eth0", [f"{host.underlay4}/24", *([f"{host.underlay6}/64"] if self.ipv6 else [])])

    def add_segment(self, name: str, address: str | Sequence[str],
                    members: Sequence[tuple[Host, str | Sequence[str]]]) -> Host:
        """A network behind some hosts (a "lan", the "internet"): a namespace ``name`` holding a bridge
        with ``address`` (e.g. ``203.0.113.1/24``, or a list: IPv4 and IPv6), and an ``eth1`` in each
        member with its address(es).

        Returned as a :class:`Host` so tests can run servers in it; it has no mesh interface.
        """
        netns = f"{self.prefix}-{name}"
        self._add_netns(netns)
        _ip("-n", netns, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
        own = [address] if isinstance(address, str) else list(address)
        for one in own:
            _ip("-n", netns, "addr", "add", one, "dev", "br0", *(["nodad"] if ":" in one else []))
        _ip("-n", netns, "link", "set", "br0", "up")
        for k, (host, host_addresses) in enumerate(members):
            port = f"p{k}"
            _ip("-n", netns, "link", "add", port, "type", "veth", "peer", "name", "eth1", "netns", host.netns)
            _ip("-n", netns, "link", "set", port, "master", "br0", "up")
            for one in [host_addresses] if isinstance(host_addresses, str) else host_addresses:
                _ip("-n", host.netns, "addr", "add", one, "dev", "eth1", *(["nodad"] if ":" in one else []))
            _ip("-n", host.netns, "link", "set", "eth1", "up")
        v6 = next((a.split("/")[0] for a in own if ":" in a), "")
        return Host(name, 0, netns, own[0].split("/")[0], v6, "", self)

    def _uapi_sockets(self) -> list[Path]:
        """Every UAPI socket of our hosts: the mesh interface and the route tunnels meshd derives from it."""
        names = re.compile("(?:" + "|".join(re.escape(h.wg_ifname) for h in self.hosts) + r")(?:r\d+|gw)?\.sock")
        return [p for p in UAPI_DIR.glob("*.sock") if names.fullmatch(p.name)] if UAPI_DIR.is_dir() else []

    def close(self) -> None:
        """Remove everything this network made; raise if something could not be removed."""
        if self._closed:
            return
        self._closed = True
        for proc in reversed(self.processes):
            self._stop(proc)
        for netns in reversed(self._namespaces):
            _delete_netns(netns)
        for path in self._uapi_sockets():
            path.unlink(missing_ok=True)
        self._remove_cgroups()
        left = self.leftovers()
        if left:
            raise RuntimeError(f"network {self.prefix} left behind: {', '.join(left)}")

    @staticmethod
    def _stop(proc: subprocess.Popen[Any]) -> None:
        if proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(3)
                    break
                except subprocess.TimeoutExpired:
                    continue
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def agent_cgroups(self) -> list[Path]:
        """The agent cgroup subtrees meshd names after our interfaces (the hierarchy is machine-wide)."""
        roots = [r for r in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")) if (r / "cgroup.procs").exists()]
        return [r / f"idmesh-{h.wg_ifname}" for r in roots for h in self.hosts if (r / f"idmesh-{h.wg_ifname}").is_dir()]

    def _remove_cgroups(self) -> None:
        """A meshd killed outright leaves its agents' cgroups: kill what is in them, remove them."""
        for top in self.agent_cgroups():
            for group in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [top]:
                if not group.is_dir():
                    continue
                try:
                    (group / "cgroup.kill").write_text("1")
                except OSError:
                    pass
                for _ in range(100):
                    try:
                        group.rmdir()
                        break
                    except OSError:
                        time.sleep(0.02)

    def leftovers(self) -> list[str]:
        """What of ours still exists: namespaces, tracked processes, UAPI sockets, agent cgroups."""
        names = [n.split(" ")[0] for n in _ip("netns", "list").stdout.splitlines()]
        left = [f"netns {n}" for n in names if n.startswith(self.prefix + "-")]
        left += [f"pid {p.pid}" for p in self.processes if _alive(p.pid)]
        left += [f"socket {s}" for s in self._uapi_sockets()]
        left += processes_mentioning([h.wg_ifname for h in self.hosts] + self._namespaces)
        left += [f"cgroup {c}" for c in self.agent_cgroups()]
        return left
