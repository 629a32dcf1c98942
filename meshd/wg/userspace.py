"""WireGuard in user space: a supervised ``wireguard-go -f IFACE`` spoken to over its UAPI socket.

Used where the kernel has no WireGuard module (as on our test machines).
One supervisor thread per device owns the child process for the device's
whole life, so exactly one place ever starts it:

* start: clear what a crashed run left (a stray wireguard-go serving our
  socket, a stale socket file, a leftover interface), start the child in the
  foreground (its daemon mode forks and was seen to die), wait until its
  UAPI socket answers;
* supervise: forward its output to logging; when it dies, start it again
  with a short back-off that grows while it keeps dying fast, re-apply the
  last desired config to the fresh device and call ``on_restart`` (the TUN
  interface died with the process, so its addresses and routes must be set
  again by the caller);
* close: SIGTERM (wireguard-go then removes its interface and socket),
  SIGKILL if it lingers, then make sure both are gone.

The UAPI socket directory is shared by all network namespaces of the host,
so an interface name must be unique on the host, not just in its namespace.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from meshcore.errors import Conflict, IdmeshError, Unavailable
from meshcore.names import check_ifname
from meshd.kernel.netlink import delete_link, link_kind

from .diff import Op, diff_device, peer_changes
from .model import DeviceConfig, DeviceState, PeerConfig
from .uapi import UAPI_DIR, UapiClient, UnixSocketTransport

__all__ = ["WireGuardGo"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_STOP_GRACE = 3.0
_MAX_BACKOFF = 5.0
_HEALTHY_AFTER = 10.0  # a child that lived this long resets the back-off


def _backoff(failures: int) -> float:
    return min(_MAX_BACKOFF, 0.05 * 2.0**failures)


def _exits_soon(proc: subprocess.Popen[bytes], within: float = 1.0) -> bool:
    """True if ``proc`` has exited or does within ``within`` s (a SIGKILLed child dies a few ms later)."""
    try:
        proc.wait(within)
    except subprocess.TimeoutExpired:
        return False
    return True


def _socket_owner(path: Path) -> int | None:
    """PID of the process serving the unix socket at ``path``; None if nobody listens (a stale file)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(os.fspath(path))
        except OSError:  # refused (nobody listens), gone, or not a socket: nobody to stop
            return None
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid or None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _same_netns(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def _kill(pid: int, grace: float = _STOP_GRACE) -> None:
    """Stop a process we did not start (so cannot wait for): SIGTERM, then SIGKILL after ``grace``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.02)
    raise Unavailable(f"process {pid} survived SIGKILL")


def clear_stale(ifname: str, sock_path: Path) -> None:
    """Remove what a crashed run left for ``ifname``, so a start never makes a duplicate.

    A wireguard-go that still serves our socket in this network namespace is a
    stray of ours (its supervisor died) and is stopped; one in another
    namespace means the name is taken on this host, which is a conflict.
    """
    if sock_path.exists():
        pid = _socket_owner(sock_path)
        if pid is not None:
            comm = _comm(pid)
            if comm != "wireguard-go":
                raise Conflict(f"{sock_path} is served by pid {pid} ({comm or '?'}), not by wireguard-go")
            if not _same_netns(pid):
                raise Conflict(f"interface name {ifname} is used by wireguard-go pid {pid} in another network "
                               f"namespace; names must be unique per host because {sock_path.parent} is shared")
            log.warning("stopping stray wireguard-go pid %d for %s left by a previous run", pid, ifname)
            _kill(pid)
        sock_path.unlink(missing_ok=True)
    kind = link_kind(ifname)
    if kind in ("tun", "wireguard"):
        log.warning("deleting leftover %s interface %s", kind, ifname)
        delete_link(ifname)
    elif kind is not None:
        raise Conflict(f"interface {ifname} exists and is a {kind or 'non-WireGuard'} interface; choose another name")


class WireGuardGo:
    """A :class:`~meshd.wg.model.WireGuardDevice` run by a supervised wireguard-go child process."""

    def __init__(
        self,
        ifname: str,
        *,
        binary: str = "wireguard-go",
        uapi_dir: Path = UAPI_DIR,
        start_timeout: float = 10.0,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self.ifname = check_ifname(ifname)
        self.binary = binary
        self.sock_path = uapi_dir / f"{ifname}.sock"
        self.start_timeout = start_timeout
        self.on_restart = on_restart
        self.restarts = 0
        self._client = UapiClient(ifname, UnixSocketTransport(self.sock_path))
        self._lock = threading.Lock()  # one UAPI conversation at a time; guards _proc, _desired, _applied
        self._stopping = threading.Event()
        self._ready = threading.Event()  # a child runs and has been given _desired
        self._first_attempt = threading.Event()
        self._start_lock = threading.Lock()  # so two first callers do not start two supervisors
        self._proc: subprocess.Popen[bytes] | None = None
        self._supervisor: threading.Thread | None = None
        self._desired: DeviceConfig | None = None  # what the caller asked for last
        self._applied: DeviceConfig | None = None  # what this child was given; None: unknown, diff the device
        # Peers as last sent, kept by key for update_peers; _desired is rebuilt from it lazily.
        self._known: dict[str, PeerConfig] | None = None
        self._stale = False
        self._last_error: IdmeshError | None = None

    # -- public -------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start the child (idempotent). Returns when its UAPI socket answers; raises if the first start fails."""
        if self._stopping.is_set():
            raise Unavailable(f"WireGuard interface {self.ifname} is closed")
        with self._start_lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._supervisor is None:
            if shutil.which(self.binary) is None:
                raise Unavailable(f"{self.binary} not found on PATH: install the wireguard-go package "
                                  f"(needed for interface {self.ifname}: the kernel has no WireGuard module)")
            self._supervisor = threading.Thread(target=self._supervise, name=f"wireguard-go {self.ifname}",
                                                daemon=True)
            self._supervisor.start()
            self._first_attempt.wait()
            if not self._ready.is_set():
                error = self._last_error
                self.close()
                raise Unavailable(f"wireguard-go for {self.ifname} did not start: {error}") from error

    def apply(self, desired: DeviceConfig) -> None:
        """Converge the device to ``desired``; kept and re-applied should wireguard-go have to be restarted."""
        with self._lock:
            self._desired = desired
            self._stale = False
        self._retrying(self._converge_locked)

    def update_peers(self, upsert: Sequence[PeerConfig], remove: Sequence[str]) -> bool:
        """Change just these peers (by key), without reading the device.

        Returns False, sending nothing, when what the device holds is not
        known (never configured, or a set failed): then apply the whole
        config instead.
        """
        def call() -> bool:
            known = self._known
            if known is None or self._desired is None:
                return False
            ops = peer_changes(known, upsert, remove)
            try:
                self._client.set(ops)
            except BaseException:
                self._known = self._applied = None
                raise
            for key in remove:
                known.pop(key, None)
            for peer in upsert:
                known[peer.public_key] = peer
            self._stale = True
            self._applied = None  # a later full apply diffs the device itself
            if ops:
                log.debug("%s: applied %d incremental WireGuard operation(s)", self.ifname, len(ops))
            return True

        return self._retrying(call)

    def state(self) -> DeviceState:
        return self._retrying(self._client.get)

    def close(self) -> None:
        """Stop the child and make sure the interface and socket are gone. Idempotent."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                self._terminate(proc)
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=2 * _STOP_GRACE + 1)
        self._ready.clear()
        if self._supervisor is None:
            return  # never started: whatever carries our name is not ours to remove
        if link_kind(self.ifname) in ("tun", "wireguard"):
            delete_link(self.ifname)
        if self.sock_path.exists() and _socket_owner(self.sock_path) is None:
            self.sock_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------
    def _wait_ready(self) -> None:
        self.start()
        if not self._ready.wait(self.start_timeout):
            raise Unavailable(f"wireguard-go for {self.ifname} is not running (restarting after: {self._last_error})")

    def _retrying(self, call: Callable[[], T]) -> T:
        """Run ``call`` under the lock; if the child died under it, wait for the restart and try once more."""
        for attempt in (1, 2):
            self._wait_ready()
            with self._lock:
                proc = self._proc
                try:
                    return call()
                except Unavailable:
                    if attempt == 2 or proc is None or self._stopping.is_set() or not _exits_soon(proc):
                        raise
                    self._ready.clear()  # the supervisor sets it again once the new child is configured
        raise AssertionError("unreachable")

    def _converge_locked(self) -> list[Op]:
        assert self._desired is not None
        if self._stale and self._known is not None:  # incremental updates happened since _desired was set
            d = self._desired
            self._desired = DeviceConfig(d.private_key, d.listen_port, tuple(self._known.values()), d.fwmark)
            self._stale = False
        try:
            ops = diff_device(self._client.get(), self._desired, self._applied)
            self._client.set(ops)
        except BaseException:
            self._applied = None  # a set is not atomic: trust the device, not our memory, next time
            self._known = None
            raise
        self._applied = self._desired
        self._known = {p.public_key: p for p in self._desired.peers}
        if ops:
            log.info("%s: applied %d WireGuard operation(s)", self.ifname, len(ops))
        return ops

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_GRACE)
        except subprocess.TimeoutExpired:
            log.warning("wireguard-go for %s ignored SIGTERM; killing pid %d", self.ifname, proc.pid)
            proc.kill()
            proc.wait()

    def _spawn_locked(self) -> subprocess.Popen[bytes]:
        clear_stale(self.ifname, self.sock_path)
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": os.environ.get("LOG_LEVEL", "error")}
        try:
            proc = subprocess.Popen([self.binary, "-f", self.ifname], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # a Ctrl-C meant for meshd must not kill it first
        except OSError as exc:
            raise Unavailable(f"cannot run {self.binary} for {self.ifname}: {exc}") from exc
        self._proc = proc
        self._applied = None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                assert proc.stdout is not None
                tail = proc.stdout.read().decode(errors="replace").strip().splitlines()
                proc.stdout.close()
                raise Unavailable(f"wireguard-go for {self.ifname} exited with status {proc.returncode}"
                                  + (f": {tail[-1]}" if tail else ""))
            try:
                self._client.get()
                return proc
            except IdmeshError:
                pass
            if time.monotonic() > deadline:
                self._terminate(proc)
                assert proc.stdout is not None
                proc.stdout.close()
                raise Unavailable(f"wireguard-go for {self.ifname}: UAPI socket {self.sock_path} did not answer "
                                  f"within {self.start_timeout:g} s")
            time.sleep(0.01)

    def _launch(self) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._stopping.is_set():
                raise Unavailable(f"WireGuard interface {self.ifname} is closed")
            proc = self._spawn_locked()
            if self._desired is not None:
                try:
                    self._converge_locked()
                except IdmeshError as exc:
                    log.error("%s: re-applying the configuration after a restart failed: %s", self.ifname, exc)
            self._ready.set()
            return proc

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                if line:
                    log.info("wireguard-go %s: %s", self.ifname, line)
        proc.wait()

    def _supervise(self) -> None:
        failures = 0
        first = True
        while not self._stopping.is_set():
            try:
                proc = self._launch()
            except IdmeshError as exc:
                self._last_error = exc
                self._first_attempt.set()
                if first:
                    return  # start() reports it; nothing ran yet, so there is nothing to keep alive
                failures += 1
                log.error("%s: %s; retrying in %.2f s", self.ifname, exc, _backoff(failures))
                self._stopping.wait(_backoff(failures))
                continue
            self._first_attempt.set()
            if not first:
                self.restarts += 1
                self._notify_restart()
            first = False
            started = time.monotonic()
            self._pump(proc)
            self._ready.clear()
            if self._stopping.is_set():
                return
            failures = 0 if time.monotonic() - started > _HEALTHY_AFTER else failures + 1
            self._last_error = Unavailable(f"wireguard-go pid {proc.pid} exited with status {proc.returncode}")
            log.warning("%s: wireguard-go pid %d exited with status %s; restarting in %.2f s", self.ifname,
                        proc.pid, proc.returncode, _backoff(failures))
            self._stopping.wait(_backoff(failures))

    def _notify_restart(self) -> None:
        if self.on_restart is None:
            return
        try:
            self.on_restart()
        except Exception:
            log.exception("%s: on_restart callback failed", self.ifname)
